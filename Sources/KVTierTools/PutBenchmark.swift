#if canImport(Glibc)
@preconcurrency import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import KVTierClient
import KVTierCore

/// Steady-state `PUT`s into kvtierd's RAM tier and durable puts, each against a baseline measured
/// in the same run: the engine of `kvtier bench put` (issue 12's store targets).
///
/// Starts a kvtierd of its own per configuration (a scratch state directory, RAM budget and disk
/// codec as flags) and one `KVTierClient` with shared memory:
/// - `fits`: a RAM budget that holds every timed put. Warm-up fills it once and deletes those
///   pages (so the timed puts land in page-arena memory committed already, as in a daemon that has
///   run a while), then `puts` prefixes are put and timed; nothing may be evicted meanwhile.
/// - `full`: a RAM budget of `fullBudgetPrefixes` prefixes, filled (and passed by one) first, so
///   every timed put evicts older pages to the disk tier.
/// Each against a single-core memcpy of the prefix's bytes (median of 10, measured just before).
/// - durable: for each page count, `durableRepetitions` rounds (after one untimed) of a plain put,
///   a durable put and a session put of that many pages, each of a fresh prefix, and a `pwrite` of
///   the bytes the durable put added to the disk tier to a file in the daemon's state directory
///   plus one `fdatasync`; the pages and the session are deleted between rounds.
/// Everything it starts is stopped, and its folders removed, on every path.
public struct PutBenchmark: Sendable {
    /// One RAM-tier configuration.
    public struct RAMResult: Sendable, Codable {
        /// `fits` (no eviction) or `full` (every put evicts).
        public var configuration: String
        public var ramBudgetBytes: Int
        public var warmupPuts: Int
        public var puts: Int
        public var bytes: Int
        public var seconds: Double
        public var gbps: Double
        public var p50Millis: Double
        public var p99Millis: Double
        /// Median single-core memcpy of one prefix's bytes, just before the timed puts.
        public var memcpyGBps: Double
        public var vsMemcpy: Double
        /// Pages the daemon evicted during the timed puts (its `evictions` counter).
        public var evictions: Int
    }

    /// Durable and session puts of one page count.
    public struct DurableResult: Sendable, Codable {
        public var pages: Int
        public var repetitions: Int
        /// Median bytes a durable put added to the disk tier (`disk_live_bytes`): what the raw
        /// write writes.
        public var encodedBytes: Int
        public var plainP50Millis: Double
        public var plainP99Millis: Double
        public var durableP50Millis: Double
        public var durableP99Millis: Double
        public var sessionP50Millis: Double
        public var sessionP99Millis: Double
        public var writeSyncP50Millis: Double
        public var writeSyncP99Millis: Double
        /// Medians: durable put over pwrite + fdatasync of the same encoded bytes.
        public var durableVsWriteSync: Double
        public var sessionVsWriteSync: Double
    }

    public struct Report: Sendable, Codable {
        /// e.g. "1×[256, 8, 128] float16 per page".
        public var model: String
        public var pageTokens: Int
        public var pageBytes: Int
        public var prefixPages: Int
        public var prefixBytes: Int
        public var diskCodec: String
        public var ram: [RAMResult]
        public var durable: [DurableResult]
        public var cpuCores: Int
        /// `/proc/loadavg`'s three averages at the start and at the end.
        public var loadAverageStart: String?
        public var loadAverageEnd: String?
        public var daemon: String
    }

    /// Configurations `run` measures.
    public enum Scenario: String, Sendable, CaseIterable {
        case fits, full, durable
    }

    /// Model of the benchmark: `layers` × [pageTokens, kvHeads, headDim] float16 keys and values.
    public var layers = 1
    public var kvHeads = 8
    public var headDim = 128
    /// Tokens per page; the daemon's default page size (256) makes 1 MiB pages.
    public var pageTokens = 256
    /// Pages per prefix of the RAM-tier puts (64 pages of 1 MiB: 64 MiB).
    public var prefixPages = 64
    /// Timed puts per RAM-tier configuration.
    public var puts = 16
    /// RAM budget of the `full` configuration, in prefixes.
    public var fullBudgetPrefixes = 4
    public var durablePages = [16, 64]
    public var durableRepetitions = 8
    public var diskCodec = "k4v4"
    public var scenarios = Scenario.allCases
    /// The kvtierd binary.
    public var daemonPath: String
    /// Where progress goes.
    public var note: @Sendable (String) -> Void

    public init(daemonPath: String, note: @escaping @Sendable (String) -> Void = { fputs("\($0)\n", stderr) }) {
        self.daemonPath = daemonPath
        self.note = note
    }

    var specification: ModelSpecification {
        ModelSpecification(name: "kvtier-put-bench", layers: layers, kvHeads: kvHeads, headDim: headDim, elementType: .float16,
                           pageTokens: pageTokens, ropeTheta: 10_000)
    }

    var pageBytes: Int { specification.shape.pageBytes(tokens: pageTokens) }

    public func run() async throws -> Report {
        guard layers >= 1, kvHeads >= 1, headDim >= 1 else { throw ToolError("--layers, --kv-heads and --head-dim must be at least 1") }
        guard (1...Limits.maxPageTokens).contains(pageTokens) else { throw ToolError("--page-tokens must be in 1...\(Limits.maxPageTokens)") }
        guard prefixPages >= 1, puts >= 1, fullBudgetPrefixes >= 1, durableRepetitions >= 1 else {
            throw ToolError("--prefix-pages, --puts, --full-budget-prefixes and --durable-repetitions must be at least 1")
        }
        guard durablePages.allSatisfy({ $0 >= 1 }) else { throw ToolError("--durable-pages must be positive page counts") }
        guard access(daemonPath, X_OK) == 0 else {
            throw ToolError("no kvtierd at \(daemonPath): build it (swift build -c release --product kvtierd) or pass --daemon PATH")
        }
        let loadStart = PutBaselines.loadAverage()
        let largest = max(prefixPages, durablePages.max() ?? 1)
        let source = PutSource(bytesPerHalf: largest * pageBytes / 2)
        defer { source.deallocate() }

        var ram: [RAMResult] = []
        if scenarios.contains(.fits) {
            // Room for every timed put and one prefix more, so nothing is evicted.
            ram.append(try await ramPhase("fits", budget: (puts + 1) * prefixPages * pageBytes, source: source))
        }
        if scenarios.contains(.full) {
            ram.append(try await ramPhase("full", budget: fullBudgetPrefixes * prefixPages * pageBytes, source: source))
        }
        var durable: [DurableResult] = []
        if scenarios.contains(.durable) && !durablePages.isEmpty {
            durable = try await durablePhase(source: source)
        }
        return Report(
            model: "\(layers)×[\(pageTokens), \(kvHeads), \(headDim)] float16 per page", pageTokens: pageTokens, pageBytes: pageBytes,
            prefixPages: prefixPages, prefixBytes: prefixPages * pageBytes, diskCodec: diskCodec, ram: ram, durable: durable,
            cpuCores: ProcessInfo.processInfo.activeProcessorCount, loadAverageStart: loadStart,
            loadAverageEnd: PutBaselines.loadAverage(), daemon: daemonPath)
    }

    // MARK: phases

    private func ramPhase(_ name: String, budget: Int, source: PutSource) async throws -> RAMResult {
        try await withDaemon(ramBudget: budget) { client, model, _ in
            var tokens = Self.tokens(count: prefixPages * pageTokens, scenario: name == "fits" ? 1 : 2)
            var next = 0
            func put() async throws -> Double {
                tokens[1] = UInt32(truncatingIfNeeded: next)
                next += 1
                return try await timedPut(client, model, tokens: tokens, source: source)
            }
            let warmup: Int
            if name == "fits" {
                // Fill the budget once, then free it: the page arena is committed from here on.
                warmup = puts
                for _ in 0..<warmup { _ = try await put() }
                _ = try await client.evictAll(modelID: model.modelID, deleteFromDisk: true)
            } else {
                // One prefix past the budget: from here every put evicts.
                warmup = fullBudgetPrefixes + 1
                for _ in 0..<warmup { _ = try await put() }
            }
            let memcpy = try PutBaselines.memcpySeconds(bytes: prefixPages * pageBytes, repetitions: 10)
            let evictionsBefore = try await client.status()["evictions"] ?? 0
            var latencies: [Double] = []
            let start = Clocks.monotonicNanoseconds()
            for _ in 0..<puts { latencies.append(try await put()) }
            let seconds = Double(Clocks.monotonicNanoseconds() - start) / 1e9
            let evictionsAfter = try await client.status()["evictions"] ?? 0
            let bytes = puts * prefixPages * pageBytes
            let gbps = Double(bytes) / seconds / 1e9
            let memcpyGBps = Double(prefixPages * pageBytes) / memcpy / 1e9
            return RAMResult(
                configuration: name, ramBudgetBytes: budget, warmupPuts: warmup, puts: puts, bytes: bytes, seconds: seconds, gbps: gbps,
                p50Millis: PutBaselines.percentile(latencies, 50) * 1e3, p99Millis: PutBaselines.percentile(latencies, 99) * 1e3,
                memcpyGBps: memcpyGBps, vsMemcpy: gbps / memcpyGBps, evictions: Int(evictionsAfter &- evictionsBefore))
        }
    }

    private func durablePhase(source: PutSource) async throws -> [DurableResult] {
        let largest = durablePages.max() ?? 1
        // Room for a round's plain, durable and session puts: nothing is evicted.
        return try await withDaemon(ramBudget: 4 * largest * pageBytes) { client, model, stateDirectory in
            let file = try PutBaselines.AppendFile(path: stateDirectory + "/raw-write-baseline")
            var results: [DurableResult] = []
            var next = 0
            for pages in durablePages {
                var tokens = Self.tokens(count: pages * pageTokens, scenario: 3)
                func fresh() -> [UInt32] {
                    tokens[1] = UInt32(truncatingIfNeeded: next)
                    next += 1
                    return tokens
                }
                var plain: [Double] = [], durable: [Double] = [], session: [Double] = [], writeSync: [Double] = [], encoded: [Double] = []
                for round in 0...durableRepetitions {
                    let plainSeconds = try await timedPut(client, model, tokens: fresh(), source: source)
                    let liveBefore = try await client.status()["disk_live_bytes"] ?? 0
                    let durableSeconds = try await timedPut(client, model, tokens: fresh(), source: source, durable: true)
                    let liveAfter = try await client.status()["disk_live_bytes"] ?? 0
                    guard liveAfter > liveBefore else {
                        throw ToolError("a durable put of \(pages) pages added no bytes to the disk tier (disk_live_bytes \(liveBefore) → \(liveAfter)); "
                                        + "is this kvtierd running without a disk tier?")
                    }
                    let name = "put-bench-\(pages)-\(round)"
                    let sessionSeconds = try await timedPut(client, model, tokens: fresh(), source: source, session: name)
                    let writeSeconds = try file.appendAndSync(bytes: Int(liveAfter - liveBefore))
                    try await client.sessionDelete(name)
                    _ = try await client.evictAll(modelID: model.modelID, deleteFromDisk: true)
                    guard round > 0 else { continue }  // the first round warms the arena, the segment and the file
                    plain.append(plainSeconds)
                    durable.append(durableSeconds)
                    session.append(sessionSeconds)
                    writeSync.append(writeSeconds)
                    encoded.append(Double(liveAfter - liveBefore))
                }
                func ms(_ values: [Double], _ q: Double) -> Double { PutBaselines.percentile(values, q) * 1e3 }
                let writeP50 = PutBaselines.percentile(writeSync, 50)
                results.append(DurableResult(
                    pages: pages, repetitions: durableRepetitions, encodedBytes: Int(PutBaselines.percentile(encoded, 50)),
                    plainP50Millis: ms(plain, 50), plainP99Millis: ms(plain, 99),
                    durableP50Millis: ms(durable, 50), durableP99Millis: ms(durable, 99),
                    sessionP50Millis: ms(session, 50), sessionP99Millis: ms(session, 99),
                    writeSyncP50Millis: writeP50 * 1e3, writeSyncP99Millis: ms(writeSync, 99),
                    durableVsWriteSync: PutBaselines.percentile(durable, 50) / writeP50,
                    sessionVsWriteSync: PutBaselines.percentile(session, 50) / writeP50))
            }
            return results
        }
    }

    /// Seconds one `put` of `tokens` takes; fails unless all of them end up cached.
    private func timedPut(_ client: KVTierClient, _ model: RegisteredModel, tokens: [UInt32], source: PutSource,
                          durable: Bool = false, session: String? = nil) async throws -> Double {
        let half = tokens.count / pageTokens * pageBytes / 2
        let start = Clocks.monotonicNanoseconds()
        let cached = try await client.put(model, tokens: tokens, keys: UnsafeRawBufferPointer(rebasing: source.keys[0..<half]),
                                          values: UnsafeRawBufferPointer(rebasing: source.values[0..<half]),
                                          session: session, durable: durable)
        let seconds = Double(Clocks.monotonicNanoseconds() - start) / 1e9
        guard cached == tokens.count else { throw ToolError("a put of \(tokens.count) tokens left \(cached) cached") }
        return seconds
    }

    /// Tokens 0, 1, 2, … with the first two made distinct per scenario (and by the caller per
    /// prefix, in `tokens[1]`): every page key hashes the first page, so nothing deduplicates.
    static func tokens(count: Int, scenario: UInt32) -> [UInt32] {
        var tokens = (0..<UInt32(count)).map { $0 }
        tokens[0] = 0x7B00_0000 | scenario
        return tokens
    }

    /// Runs `body` with a client of a fresh kvtierd (RAM budget `ramBudget`, no disk budget, the
    /// benchmark's disk codec) and the model registered; stops the daemon and removes its folder
    /// after.
    private func withDaemon<T>(
        ramBudget: Int, _ body: (KVTierClient, RegisteredModel, _ stateDirectory: String) async throws -> T
    ) async throws -> T {
        let scratch = try makeScratchDirectory(prefix: "kvtier-put-")
        defer { removeTree(scratch) }
        let socket = scratch + "/kvtierd.sock", log = scratch + "/kvtierd.log", state = scratch + "/state"
        let daemon = try ServeChild(
            name: "kvtierd", executable: daemonPath,
            arguments: ["--socket", socket, "--state-dir", state, "--ram-budget", "\(ramBudget)", "--disk-codec", diskCodec,
                        "--log-level", "warning"],
            pipes: false, logPath: log)
        defer { daemon.terminate() }
        let client = try await connectWhenServing(daemon, socket: socket, log: log, clientName: "kvtier-put-bench")
        do {
            guard client.usesSharedMemory else {
                throw ToolError("no shared memory with kvtierd: \(client.sharedMemoryUnavailableReason ?? "not offered")")
            }
            let model = try await client.registerModel(specification)
            let result = try await body(client, model, state)
            await client.close()
            let status = daemon.terminate()
            if status != 0 { note("warning: kvtierd exited with wait status \(status); log:\n\(ServeBenchmark.tail(log))") }
            return result
        } catch {
            await client.close()
            guard daemon.isRunning else { throw ToolError("kvtierd exited during the run (\(error)):\n\(ServeBenchmark.tail(log))") }
            throw error
        }
    }
}

/// Keys and values of the largest put, `[1, tokens, kvHeads, headDim]` fp16 each: a fixed
/// pseudo-random pattern of finite values in (-2, 2), the same for every prefix (pages are keyed
/// by tokens, never by content).
private struct PutSource {
    let keys: UnsafeMutableRawBufferPointer
    let values: UnsafeMutableRawBufferPointer

    init(bytesPerHalf: Int) {
        keys = .allocate(byteCount: bytesPerHalf, alignment: 4096)
        values = .allocate(byteCount: bytesPerHalf, alignment: 4096)
        var random = SplitMix64(seed: 0x9075)
        for buffer in [keys, values] {
            let halves = buffer.bindMemory(to: UInt16.self)
            for i in halves.indices { halves[i] = UInt16(truncatingIfNeeded: random.next() & 0xBFFF) }
        }
    }

    func deallocate() {
        keys.deallocate()
        values.deallocate()
    }
}
