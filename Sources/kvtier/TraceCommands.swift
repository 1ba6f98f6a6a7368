@preconcurrency import Glibc
import ArgumentParser
import KVTierCodec
import KVTierCore
import KVTierStore
import KVTierTools
import Logging

/// `kvtier bench trace`: replays a request trace against the tiered store, heat vs LRU.
struct TraceBenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "trace",
        abstract: "Replay a request trace against the RAM and disk tiers, with heat and with LRU eviction.",
        discussion: """
            FILE is JSON lines of {timestamp, input_length, output_length, hash_ids} (the Mooncake \
            trace format: hash_ids name 512-token prefix blocks, equal ids are reusable KV). Each \
            hash id becomes one page of deterministic token ids, so equal id prefixes share pages \
            through the store's real hash chain. Per request: lookup, get of the cached prefix \
            (disk pages are promoted), put of the rest. The replay runs twice in this process, on a \
            RAM tier in shared memory over a disk tier in a temporary folder under --dir, once per \
            eviction policy, with equal budgets. Requests run back to back: the store's clock is \
            wall time, so the trace's timeline is compressed (see docs/benchmarks.md). The default \
            model is tiny (64 KiB pages) and the default 2,000-request prefix replays both policies in about half a minute.
            """
    )

    @Option(help: "The trace (JSON lines).") var trace: String
    @Option(help: "Model layers.") var layers = 1
    @Option(name: .customLong("kv-heads"), help: "KV heads.") var kvHeads = 1
    @Option(name: .customLong("head-dim"), help: "Head dimension (a multiple of 32 for the k4v4 disk codec).") var headDim = 32
    @Option(name: .customLong("block-tokens"), help: "Tokens per trace block, and per page.") var blockTokens = 512
    @Option(name: .customLong("ram-budget"), help: "RAM tier budget (e.g. 1GiB); default: 10% of the trace's unique pages.")
    var ramBudget: String?
    @Option(name: .customLong("ram-fraction"), help: "RAM budget as a fraction of the unique pages, when --ram-budget is not given.")
    var ramFraction = 0.1
    @Option(name: .customLong("disk-budget"), help: "Disk tier budget; default: unlimited.") var diskBudget: String?
    @Option(help: "Replay the first N requests (default 2000, about 30 s for both policies; the whole Mooncake trace takes minutes).")
    var requests = 2000
    @Option(name: .customLong("half-life"), help: "Heat half-life in seconds (store default 60).") var halfLife: Double?
    @Option(name: .customLong("min-residence"), help: "Minimum RAM residence in seconds for heat (store default 2).")
    var minResidence: Double?
    @Option(help: "Folder for the temporary disk stores (default /dev/shm: a real disk makes each eviction wait for fdatasync).")
    var dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp"
    @Flag(help: "Print the report as JSON.") var json = false

    func run() async throws {
        var options = TraceReplay.Options()
        options.layers = layers
        options.kvHeads = kvHeads
        options.headDim = headDim
        options.blockTokens = blockTokens
        options.ramFraction = ramFraction
        options.parentDirectory = dir
        func size(_ text: String?, _ flag: String) throws -> Int? {
            guard let text else { return nil }
            guard let bytes = ByteCount(parsing: text), bytes.bytes > 0 else { throw ValidationError("\(flag): not a size: \(text)") }
            return bytes.bytes
        }
        options.ramBudgetBytes = try size(ramBudget, "--ram-budget")
        options.diskBudgetBytes = try size(diskBudget, "--disk-budget")
        if let halfLife {
            guard halfLife > 0 else { throw ValidationError("--half-life must be positive") }
            options.heatHalfLifeMicros = UInt64(halfLife * 1e6)
        }
        if let minResidence {
            guard minResidence >= 0 else { throw ValidationError("--min-residence must not be negative") }
            options.minResidenceMicros = UInt64(minResidence * 1e6)
        }
        if requests < 1 { throw ValidationError("--requests must be at least 1") }
        do { try options.diskCodec.quantizer.check(TraceReplay(options: options).model.pageShape(tokens: blockTokens).section) } catch {
            throw ValidationError("the disk codec k4v4 cannot store this shape: \(error)")
        }
        let loaded = try TraceFile.load(trace, limit: requests)
        guard !loaded.isEmpty else { throw ValidationError("the trace \(trace) holds no requests") }
        var logger = Logger(label: "kvtier", factory: { StreamLogHandler.standardError(label: $0) })
        logger.logLevel = .warning
        let r = try await TraceReplay(options: options).run(loaded, trace: trace, logger: logger)
        if json { return try printJSON(r) }

        func pct(_ v: Double) -> String { formatDecimal(v * 100, places: 2) + "%" }
        func points(_ v: Double) -> String { (v >= 0 ? "+" : "") + formatDecimal(v * 100, places: 2) + " pts" }
        print("trace      \(r.trace): \(r.requests) requests over \(formatDecimal(r.traceSeconds, places: 0)) s, \(r.uniquePages) unique pages")
        print("model      \(r.model), \(ByteCount(r.pageBytes)) per page")
        print("budgets    RAM \(ByteCount(r.ramBudgetBytes)) (\(r.ramBudgetBytes / max(r.pageBytes, 1)) pages), disk \(r.diskBudgetBytes.map { ByteCount($0).description } ?? "unlimited") (\(r.diskCodec))")
        print("heat       half-life \(formatDecimal(Double(r.heatHalfLifeMicros) / 1e6, places: 3)) s, min residence \(formatDecimal(Double(r.minResidenceMicros) / 1e6, places: 3)) s; trace time ran \(formatDecimal(r.timeCompression, places: 1))× faster than recorded")
        print("")
        let rows: [(String, (TraceReplay.Result) -> String)] = [
            ("requests", { "\($0.requests)" }),
            ("input tokens", { "\($0.inputTokens)" }),
            ("RAM hit tokens", { "\($0.ramHitTokens) (\(pct($0.ramHitRate)))" }),
            ("disk hit tokens", { "\($0.diskHitTokens) (\(pct($0.diskHitRate)))" }),
            ("missed tokens", { "\($0.missTokens) (\(pct($0.missRate)))" }),
            ("read from disk", { "\(ByteCount($0.diskBytesRead)) (\(ByteCount($0.promotedBytes)) fp16, \($0.promotions) promotions)" }),
            ("RAM evictions", { "\($0.evictions)" }),
            ("pages stored", { "\($0.pagesStored) (+\($0.pagesDeduplicated) deduplicated)" }),
            ("disk at end", { "\($0.diskPagesAtEnd) pages, \(ByteCount($0.diskLiveBytesAtEnd)) (\($0.diskEvictions) deleted by budget)" }),
            ("replay time", { formatDecimal($0.seconds, places: 1) + " s" }),
        ]
        printTable(["MEASURE", "HEAT", "LRU"], rows.map { [$0.0, $0.1(r.heat), $0.1(r.lru)] })
        print("")
        print("heat − LRU: RAM hit rate \(points(r.ramHitRateDelta)), hit rate \(points(r.hitRateDelta)), disk bytes read \(r.diskBytesReadDelta >= 0 ? "+" : "−")\(ByteCount(abs(r.diskBytesReadDelta)))")
    }
}
