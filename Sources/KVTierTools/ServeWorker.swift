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

/// One client process of `kvtier bench serve` (`kvtier bench serve-worker`, hidden): connects to
/// kvtierd or redis-server, says `ready`, then runs the phases the parent names on its stdin
/// (`put`, `get`, `quit`), answering each with one JSON line (`ServePhaseResult`).
///
/// Pages are one sequence of `pageTokens` tokens of the model `ServeWorker.model(pageBytes:)`
/// (1 layer × [pageTokens, 8, 128] float16), its tokens distinct per worker and per page so
/// nothing deduplicates. Redis gets the same bytes under the key `kv:<worker>:<page>`.
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

        public init(backend: Backend, socketPath: String, worker: Int, pageBytes: Int, seconds: Double, maxPages: Int) {
            self.backend = backend
            self.socketPath = socketPath
            self.worker = worker
            self.pageBytes = pageBytes
            self.seconds = seconds
            self.maxPages = maxPages
        }
    }

    /// Bytes per token of the benchmark model: 1 layer × (keys + values) × 8 heads × 128 × fp16.
    public static let bytesPerToken = KVShape(layers: 1, kvHeads: 8, headDim: 128).bytesPerToken

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
                    guard i < options.maxPages else { return nil }
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

    /// Runs `operation(i)` for i = 0, 1, … until `seconds` pass or it returns nil.
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
        return ServePhaseResult(operation: name, worker: options.worker, operations: operations, bytes: operations * options.pageBytes,
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

/// A page's bytes: a fixed pattern with the page's tag (worker, index) in its first 8 bytes.
private struct PageSource {
    let keys: UnsafeMutableRawBufferPointer
    let values: UnsafeMutableRawBufferPointer
    /// Where gets copy pages to: the client's private memory.
    let privateCopy: UnsafeMutableRawBufferPointer
    let worker: Int

    init(pageBytes: Int, worker: Int) {
        keys = .allocate(byteCount: pageBytes / 2, alignment: 4096)
        values = .allocate(byteCount: pageBytes / 2, alignment: 4096)
        privateCopy = .allocate(byteCount: pageBytes, alignment: 4096)
        self.worker = worker
        // fp16 values in [-2, 2): a plausible bit pattern, not zeros the kernel could share.
        var random = SplitMix64(seed: 0x5E7E + UInt64(worker))
        for buffer in [keys, values] {
            let halves = buffer.bindMemory(to: UInt16.self)
            for i in halves.indices { halves[i] = UInt16(truncatingIfNeeded: random.next() & 0xBFFF) }
        }
        privateCopy.initializeMemory(as: UInt8.self, repeating: 0)
    }

    func tag(_ page: Int) -> UInt64 { UInt64(worker) << 40 | UInt64(page) }

    func stamp(_ page: Int) { keys.storeBytes(of: tag(page), as: UInt64.self) }

    func check(_ page: Int, length: Int, expected: Int) throws {
        guard length == expected else { throw ToolError("page \(page) of worker \(worker) came back with \(length) bytes, not \(expected)") }
        let got = privateCopy.load(as: UInt64.self)
        guard got == tag(page) else { throw ToolError("page \(page) of worker \(worker) came back with another page's bytes") }
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
        worker = options.worker
        source = PageSource(pageBytes: options.pageBytes, worker: options.worker)
    }

    /// Distinct per worker and page: the page key hashes all of them.
    func tokens(_ page: Int) -> [UInt32] {
        var tokens = [UInt32](unsafeUninitializedCapacity: pageTokens) { buffer, count in
            for i in 0..<pageTokens { buffer[i] = UInt32(i) }
            count = pageTokens
        }
        tokens[0] = 0x5E00_0000 | UInt32(worker)
        if pageTokens > 1 { tokens[1] = UInt32(truncatingIfNeeded: page) }
        return tokens
    }

    mutating func put(_ page: Int) async throws {
        source.stamp(page)
        let cached = try await client.put(model, tokens: tokens(page), keys: UnsafeRawBufferPointer(source.keys),
                                          values: UnsafeRawBufferPointer(source.values))
        guard cached == pageTokens else { throw ToolError("put of page \(page) left \(cached) of \(pageTokens) tokens cached") }
    }

    mutating func get(_ page: Int) async throws {
        let destination = source.privateCopy
        let copied = try await client.withLeasedPages(model, tokens: tokens(page)) { leased -> Int in
            var at = 0
            for leasedPage in leased.pages {
                let bytes = leasedPage.bytes
                guard at + bytes.count <= destination.count else { return -1 }
                memcpy(destination.baseAddress! + at, bytes.baseAddress!, bytes.count)
                at += bytes.count
            }
            return at
        }
        try source.check(page, length: copied, expected: pageBytes)
    }

    func close() async { await client.close() }
    func finish() { source.deallocate() }
}

private struct RedisEngine: Engine {
    let connection: RESPConnection
    let source: PageSource
    let pageBytes: Int
    let worker: Int

    init(_ options: ServeWorker.Options) throws {
        connection = try RESPConnection(path: options.socketPath)
        pageBytes = options.pageBytes
        worker = options.worker
        source = PageSource(pageBytes: options.pageBytes, worker: options.worker)
    }

    func key(_ page: Int) -> [UInt8] { Array("kv:\(worker):\(page)".utf8) }

    /// The page as redis stores it: keys then values, the same bytes kvtierd stores.
    mutating func put(_ page: Int) async throws {
        source.stamp(page)
        // One contiguous value, as a client holding a page would send it: pack into the
        // private buffer (a copy, like kvtier's packing into the arena), then SET.
        let half = pageBytes / 2
        let value = source.privateCopy
        memcpy(value.baseAddress!, source.keys.baseAddress!, half)
        memcpy(value.baseAddress! + half, source.values.baseAddress!, half)
        try connection.set(key: key(page), value: UnsafeRawBufferPointer(value))
    }

    mutating func get(_ page: Int) async throws {
        let length = try connection.get(key: key(page), into: source.privateCopy)
        try source.check(page, length: length, expected: pageBytes)
    }

    func close() async {}
    func finish() { source.deallocate() }
}
