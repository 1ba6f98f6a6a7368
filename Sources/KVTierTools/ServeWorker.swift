#if canImport(Glibc)
@preconcurrency import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Histogram
import KVTierClient
import KVTierCore
import KVTierRemote

/// One client process of `kvtier bench serve` (`kvtier bench serve-worker`, hidden): connects to
/// kvtierd or redis-server, says `ready`, then runs the phases the parent names on its stdin
/// (`put`, `get`, `quit`), answering each with one JSON line (`ServePhaseResult`).
///
/// The unit of work is a prefix of `pagesPerGet` pages of the model
/// `ServeWorker.model(pageBytes:)` (1 layer × [pageTokens, 8, 128] float16): one sequence of
/// `pagesPerGet × pageTokens` tokens, distinct per worker and per prefix so nothing
/// deduplicates, put with one `KVTierClient.put` and fetched with one `GET`. Redis gets the same
/// bytes under the keys `kv:<worker>:<page>`, one per page, with SET/GET for one page and
/// MSET/MGET for several.
public enum ServeWorker {
    public enum Backend: String, Codable, Sendable, CaseIterable {
        case kvtier, redis
    }

    public struct Options: Sendable {
        public var backend: Backend
        public var socketPath: String
        public var worker: Int
        public var pageBytes: Int
        public var seconds: Double
        /// Pages the put phase writes at most (the working set of this worker).
        public var maxPages: Int
        /// Pages each put and get moves in one request (a prefix of that many pages).
        public var pagesPerGet: Int

        public init(backend: Backend, socketPath: String, worker: Int, pageBytes: Int, seconds: Double, maxPages: Int, pagesPerGet: Int = 1) {
            self.backend = backend
            self.socketPath = socketPath
            self.worker = worker
            self.pageBytes = pageBytes
            self.seconds = seconds
            self.maxPages = maxPages
            self.pagesPerGet = pagesPerGet
        }
    }

    /// Bytes per token of the benchmark model: 1 layer × (keys + values) × 8 heads × 128 × fp16.
    public static let bytesPerToken = ModelShape(layers: 1, kvHeads: 8, headDim: 128).bytesPerToken

    /// The model whose one page is `pageBytes` bytes; nil when no whole token count fits.
    public static func model(pageBytes: Int) -> ModelSpecification? {
        guard pageBytes > 0, pageBytes % bytesPerToken == 0 else { return nil }
        let tokens = pageBytes / bytesPerToken
        guard tokens <= Limits.maxPageTokens else { return nil }
        return ModelSpecification(name: "kvtier-serve-bench", layers: 1, kvHeads: 8, headDim: 128, elementType: .float16,
                                  pageTokens: tokens, ropeTheta: 10_000)
    }

    /// The histogram every worker records latencies into, in nanoseconds.
    public static func makeHistogram() -> Histogram<UInt64> {
        Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
    }

    /// Runs the worker: `receive` gives the parent's next line (nil at EOF), `send` writes one.
    public static func run(_ options: Options, receive: () -> String?, send: (String) -> Void) async throws {
        guard options.pagesPerGet >= 1 else { throw ToolError("--pages-per-get must be at least 1") }
        guard let spec = model(pageBytes: options.pageBytes) else {
            throw ToolError("page size \(options.pageBytes) is not a whole number of \(bytesPerToken)-byte tokens (at most \(Limits.maxPageTokens))")
        }
        var engine: any Engine = switch options.backend {
        case .kvtier: try await KVTierEngine(options, spec)
        case .redis: try RedisEngine(options)
        }
        defer { engine.finish() }
        let encoder = JSONEncoder()
        send("ready")
        var written = 0
        while let line = receive() {
            let command = String(line.filter { !$0.isWhitespace })
            switch command {
            case "put":
                let result = try await phase("put", options) { i in
                    guard i < max(1, options.maxPages / options.pagesPerGet) else { return nil }
                    try await engine.put(i)
                    return i
                }
                written = result.operations
                send(String(decoding: try encoder.encode(result), as: UTF8.self))
            case "get":
                guard written > 0 else { throw ToolError("get before any put") }
                let start = (options.worker * 7919) % written
                let result = try await phase("get", options) { i in
                    let page = (start + i) % written
                    try await engine.get(page)
                    return page
                }
                send(String(decoding: try encoder.encode(result), as: UTF8.self))
            case "quit", "":
                await engine.close()
                return
            default:
                throw ToolError("unknown worker command '\(command)'")
            }
        }
        await engine.close()
    }

    /// Runs `operation(i)` for i = 0, 1, … until `seconds` pass or it returns nil; each
    /// operation moves `pagesPerGet` pages.
    private static func phase(_ name: String, _ options: Options, _ operation: (Int) async throws -> Int?) async throws -> ServePhaseResult {
        var histogram = makeHistogram()
        let start = Clocks.monotonicNanoseconds()
        let end = start + UInt64(options.seconds * 1e9)
        var operations = 0
        var now = start
        while now < end {
            guard try await operation(operations) != nil else { break }
            let after = Clocks.monotonicNanoseconds()
            _ = histogram.record(max(1, after - now))
            now = after
            operations += 1
        }
        return ServePhaseResult(operation: name, worker: options.worker, operations: operations,
                                bytes: operations * options.pagesPerGet * options.pageBytes,
                                startNanos: start, endNanos: now, latencyNanos: histogram)
    }
}

/// What one worker did in one phase.
public struct ServePhaseResult: Codable, Sendable {
    public var operation: String
    public var worker: Int
    public var operations: Int
    public var bytes: Int
    /// CLOCK_MONOTONIC, shared by all processes of the machine.
    public var startNanos: UInt64
    public var endNanos: UInt64
    public var latencyNanos: Histogram<UInt64>
}

private protocol Engine {
    mutating func put(_ page: Int) async throws
    mutating func get(_ page: Int) async throws
    func close() async
    func finish()
}

/// A prefix's bytes, `pages` pages: a fixed pattern with each page's tag (worker, index) in its
/// first 8 bytes (the first key row of the page).
private struct PageSource {
    /// `[pages × pageTokens, 8, 128]` fp16 each, as `KVTierClient.put` takes them.
    let keys: UnsafeMutableRawBufferPointer
    let values: UnsafeMutableRawBufferPointer
    /// Where gets copy pages to: the client's private memory, page after page.
    let privateCopy: UnsafeMutableRawBufferPointer
    let worker: Int
    let pageBytes: Int
    let pages: Int

    init(pageBytes: Int, pages: Int, worker: Int) {
        keys = .allocate(byteCount: pages * pageBytes / 2, alignment: 4096)
        values = .allocate(byteCount: pages * pageBytes / 2, alignment: 4096)
        privateCopy = .allocate(byteCount: pages * pageBytes, alignment: 4096)
        self.worker = worker
        self.pageBytes = pageBytes
        self.pages = pages
        // fp16 values in [-2, 2): a plausible bit pattern, not zeros the kernel could share.
        var random = SplitMix64(seed: 0x5E7E + UInt64(worker))
        for buffer in [keys, values] {
            let halves = buffer.bindMemory(to: UInt16.self)
            for i in halves.indices { halves[i] = UInt16(truncatingIfNeeded: random.next() & 0xBFFF) }
        }
        privateCopy.initializeMemory(as: UInt8.self, repeating: 0)
    }

    func tag(_ page: Int) -> UInt64 { UInt64(worker) << 40 | UInt64(page) }

    /// Tags the pages of prefix `prefix`: page j of it is page `prefix × pages + j`.
    func stamp(prefix: Int) {
        for j in 0..<pages { keys.storeBytes(of: tag(prefix * pages + j), toByteOffset: j * pageBytes / 2, as: UInt64.self) }
    }

    /// Checks that the private copy holds the pages of `prefix`, in order.
    func check(prefix: Int, length: Int) throws {
        guard length == pages * pageBytes else {
            throw ToolError("prefix \(prefix) of worker \(worker) came back with \(length) bytes, not \(pages * pageBytes)")
        }
        for j in 0..<pages where privateCopy.load(fromByteOffset: j * pageBytes, as: UInt64.self) != tag(prefix * pages + j) {
            throw ToolError("page \(j) of prefix \(prefix) of worker \(worker) came back with another page's bytes")
        }
    }

    func deallocate() {
        keys.deallocate()
        values.deallocate()
        privateCopy.deallocate()
    }
}

private struct KVTierEngine: Engine {
    let client: KVTierClient
    let model: RegisteredModel
    let source: PageSource
    let pageBytes: Int
    let pageTokens: Int
    let pages: Int
    let worker: Int

    init(_ options: ServeWorker.Options, _ spec: ModelSpecification) async throws {
        client = try await KVTierClient.connect(socketPath: options.socketPath, clientName: "kvtier-serve-bench-\(options.worker)",
                                                mapSharedMemory: true, replyTimeoutSeconds: 60)
        guard client.usesSharedMemory else {
            let reason = client.sharedMemoryUnavailableReason ?? "not offered"
            await client.close()
            throw ToolError("no shared memory with kvtierd: \(reason)")
        }
        do { model = try await client.registerModel(spec) } catch {
            await client.close()
            throw error
        }
        pageBytes = options.pageBytes
        pageTokens = spec.pageTokens
        pages = options.pagesPerGet
        worker = options.worker
        source = PageSource(pageBytes: options.pageBytes, pages: options.pagesPerGet, worker: options.worker)
    }

    /// Distinct per worker and prefix: every page key hashes the first page.
    func tokens(_ prefix: Int) -> [UInt32] {
        let count = pages * pageTokens
        var tokens = [UInt32](unsafeUninitializedCapacity: count) { buffer, initialized in
            for i in 0..<count { buffer[i] = UInt32(i) }
            initialized = count
        }
        tokens[0] = 0x5E00_0000 | UInt32(worker)
        if count > 1 { tokens[1] = UInt32(truncatingIfNeeded: prefix) }
        return tokens
    }

    mutating func put(_ prefix: Int) async throws {
        source.stamp(prefix: prefix)
        let cached = try await client.put(model, tokens: tokens(prefix), keys: UnsafeRawBufferPointer(source.keys),
                                          values: UnsafeRawBufferPointer(source.values))
        guard cached == pages * pageTokens else { throw ToolError("put of prefix \(prefix) left \(cached) of \(pages * pageTokens) tokens cached") }
    }

    /// One GET of the prefix, every page copied out of the arena into private memory (what a
    /// client does before the lease ends).
    mutating func get(_ prefix: Int) async throws {
        let destination = source.privateCopy
        let copied = try await client.withLeasedPages(model, tokens: tokens(prefix)) { leased -> Int in
            var at = 0
            for leasedPage in leased.pages {
                let bytes = leasedPage.bytes
                guard at + bytes.count <= destination.count else { return -1 }
                memcpy(destination.baseAddress! + at, bytes.baseAddress!, bytes.count)
                at += bytes.count
            }
            return at
        }
        try source.check(prefix: prefix, length: copied)
    }

    func close() async { await client.close() }
    func finish() { source.deallocate() }
}

private struct RedisEngine: Engine {
    let connection: RESPConnection
    let source: PageSource
    let pageBytes: Int
    let pages: Int
    let worker: Int

    init(_ options: ServeWorker.Options) throws {
        connection = try RESPConnection.connect(to: .unix(path: options.socketPath), timeoutMillis: 5_000)
        connection.deadline = .never
        pageBytes = options.pageBytes
        pages = options.pagesPerGet
        worker = options.worker
        source = PageSource(pageBytes: options.pageBytes, pages: options.pagesPerGet, worker: options.worker)
    }

    func key(_ page: Int) -> [UInt8] { Array("kv:\(worker):\(page)".utf8) }

    func keys(_ prefix: Int) -> [[UInt8]] { (0..<pages).map { key(prefix * pages + $0) } }

    /// Each page as redis stores it: keys then values, the same bytes kvtierd stores.
    mutating func put(_ prefix: Int) async throws {
        source.stamp(prefix: prefix)
        // One contiguous value per page, as a client holding a page would send it: pack into
        // the private buffer (a copy, like kvtier's packing into the arena), then SET (MSET).
        let half = pageBytes / 2
        let value = source.privateCopy
        for j in 0..<pages {
            memcpy(value.baseAddress! + j * pageBytes, source.keys.baseAddress! + j * half, half)
            memcpy(value.baseAddress! + j * pageBytes + half, source.values.baseAddress! + j * half, half)
        }
        if pages == 1 {
            try connection.set(key: key(prefix), value: UnsafeRawBufferPointer(value))
        } else {
            try connection.mset(keys: keys(prefix), values: (0..<pages).map {
                UnsafeRawBufferPointer(rebasing: value[$0 * pageBytes..<($0 + 1) * pageBytes])
            })
        }
    }

    /// One GET (MGET for several pages), the values received straight into private memory.
    mutating func get(_ prefix: Int) async throws {
        let length: Int
        if pages == 1 {
            length = try connection.get(key: key(prefix), into: source.privateCopy)
        } else {
            let lengths = try connection.mget(keys: keys(prefix), into: source.privateCopy)
            length = lengths.contains { $0 < 0 } ? -1 : lengths.reduce(0, +)
        }
        try source.check(prefix: prefix, length: length)
    }

    func close() async {}
    func finish() { source.deallocate() }
}
