#if canImport(Glibc)
@preconcurrency import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import KVTierCodec
import KVTierCore
import KVTierIO
import KVTierStore
import Logging

/// One request of a Mooncake-style trace: prefix blocks of `blockTokens` tokens named by hash
/// ids (equal ids are equal blocks, so equal id prefixes are reusable KV).
public struct TraceRequest: Sendable, Equatable, Codable {
    public var timestamp: UInt64
    public var inputLength: Int
    public var outputLength: Int
    public var hashIDs: [UInt64]

    enum CodingKeys: String, CodingKey {
        case timestamp
        case inputLength = "input_length"
        case outputLength = "output_length"
        case hashIDs = "hash_ids"
    }

    public init(timestamp: UInt64, inputLength: Int, outputLength: Int, hashIDs: [UInt64]) {
        self.timestamp = timestamp
        self.inputLength = inputLength
        self.outputLength = outputLength
        self.hashIDs = hashIDs
    }

    /// Token ids standing for the request's input: block `b` (hash id `h`) holds tokens
    /// `h * blockTokens + i` (mod 2^32), so equal hash-id prefixes give equal page keys through
    /// the store's real hash chain. The last block covers what is left of `inputLength`.
    public func tokens(blockTokens: Int) -> [UInt32] {
        let count = min(inputLength, hashIDs.count * blockTokens)
        var tokens = [UInt32]()
        tokens.reserveCapacity(count)
        for (b, id) in hashIDs.enumerated() {
            let start = b * blockTokens
            guard start < count else { break }
            let base = id &* UInt64(blockTokens)
            for i in 0..<min(blockTokens, count - start) {
                tokens.append(UInt32(truncatingIfNeeded: base &+ UInt64(i)))
            }
        }
        return tokens
    }
}

public enum TraceError: Error, CustomStringConvertible {
    case unreadable(String, String)
    case malformed(String, line: Int, String)

    public var description: String {
        switch self {
        case .unreadable(let path, let why): "cannot read the trace \(path): \(why)"
        case .malformed(let path, let line, let why): "\(path):\(line): not a trace request (timestamp, input_length, output_length, hash_ids): \(why)"
        }
    }
}

public enum TraceFile {
    /// Reads a JSON-lines trace (blank lines skipped), at most `limit` requests.
    public static func load(_ path: String, limit: Int? = nil) throws(TraceError) -> [TraceRequest] {
        let data: Data
        do { data = try Data(contentsOf: URL(fileURLWithPath: path)) } catch { throw .unreadable(path, "\(error)") }
        let decoder = JSONDecoder()
        var requests: [TraceRequest] = []
        var lineNumber = 0
        for line in data.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false) {
            lineNumber += 1
            if let limit, requests.count >= limit { break }
            if line.allSatisfy({ $0 == UInt8(ascii: " ") || $0 == UInt8(ascii: "\r") || $0 == UInt8(ascii: "\t") }) { continue }
            do { requests.append(try decoder.decode(TraceRequest.self, from: Data(line))) } catch {
                throw .malformed(path, line: lineNumber, "\(error)")
            }
        }
        return requests
    }
}

/// Replays a trace in-process against a `TieredStore` (RAM tier on `ArenaPageMemory`, disk
/// tier on `PosixStorage` in a temporary folder), once per eviction policy with equal budgets.
/// Per request: lookup (hit tokens per tier), get of the cached prefix (disk pages are promoted,
/// then the lease is released), put of the rest of the input (pattern KV through the real put
/// path, chunked as docs/protocol.md says). Requests run in order without sleeping: the store's
/// clock is wall time, so the trace's hour is compressed into the replay's seconds.
public struct TraceReplay: Sendable {
    public struct Options: Sendable {
        public var layers = 1
        public var kvHeads = 1
        public var headDim = 32
        public var blockTokens = 512
        /// RAM budget; nil: `ramFraction` of the trace's unique pages.
        public var ramBudgetBytes: Int?
        public var ramFraction = 0.1
        /// Disk budget; nil: unlimited.
        public var diskBudgetBytes: Int?
        public var diskCodec = Codec(.k4v4)
        public var minResidenceMicros: UInt64 = TieredStore.Configuration().minResidenceMicros
        public var heatHalfLifeMicros: UInt64 = TieredStore.Configuration().heatHalfLifeMicros
        /// Parent of the temporary store folders.
        public var parentDirectory = "/tmp"
        public init() {}
    }

    /// Figures of one replay.
    public struct Result: Sendable, Equatable, Codable {
        public var policy: String
        public var requests = 0
        public var inputTokens = 0
        public var ramHitTokens = 0
        public var diskHitTokens = 0
        public var missTokens = 0
        public var ramHitRate = 0.0
        public var diskHitRate = 0.0
        public var missRate = 0.0
        /// Record bytes read from disk to promote pages (what the disk delivers, k4v4-coded).
        public var diskBytesRead = 0
        /// Decoded (fp16) bytes of the pages promoted from disk.
        public var promotedBytes = 0
        public var promotions = 0
        public var evictions = 0
        public var pagesStored = 0
        public var pagesDeduplicated = 0
        public var diskPagesAtEnd = 0
        public var diskLiveBytesAtEnd = 0
        /// Pages the disk budget deleted.
        public var diskEvictions = 0
        public var putRetries = 0
        public var seconds = 0.0

        public init(policy: String) { self.policy = policy }

        mutating func finish() {
            let total = Double(max(inputTokens, 1))
            ramHitRate = Double(ramHitTokens) / total
            diskHitRate = Double(diskHitTokens) / total
            missRate = Double(missTokens) / total
        }
    }

    public struct Report: Sendable, Equatable, Codable {
        public var trace: String
        public var requests: Int
        public var traceSeconds: Double
        public var uniquePages: Int
        public var model: String
        public var pageBytes: Int
        public var ramBudgetBytes: Int
        public var diskBudgetBytes: Int?
        public var diskCodec: String
        public var heatHalfLifeMicros: UInt64
        public var minResidenceMicros: UInt64
        /// Trace time over replay time (per policy, the heat replay's).
        public var timeCompression: Double
        public var heat: Result
        public var lru: Result
        /// heat − lru, in rate points and bytes.
        public var ramHitRateDelta: Double
        public var hitRateDelta: Double
        public var diskBytesReadDelta: Int
    }

    public var options: Options
    public init(options: Options = Options()) { self.options = options }

    public var model: ModelSpec {
        ModelSpec(id: 0x7472_6163_6500_0001, name: "trace-\(options.layers)x\(options.kvHeads)x\(options.headDim)", layers: options.layers,
                  kvHeads: options.kvHeads, headDim: options.headDim, elementType: .float16, pageTokens: options.blockTokens)
    }

    public var pageBytes: Int { model.bytesPerToken * options.blockTokens }

    public static func uniquePages(_ requests: [TraceRequest]) -> Int {
        var ids = Set<UInt64>()
        for r in requests { ids.formUnion(r.hashIDs) }
        return ids.count
    }

    public func ramBudget(for requests: [TraceRequest]) -> Int {
        options.ramBudgetBytes ?? max(pageBytes, Int(Double(Self.uniquePages(requests)) * options.ramFraction) * pageBytes)
    }

    /// Both policies, each on a fresh store and disk, and their difference.
    public func run(_ requests: [TraceRequest], trace: String, logger: Logger) async throws -> Report {
        let heat = try await withStore(.heat, requests: requests, logger: logger) { try await replay(requests, on: $0, disk: $1, policy: "heat") }
        let lru = try await withStore(.lru, requests: requests, logger: logger) { try await replay(requests, on: $0, disk: $1, policy: "lru") }
        let span = Double((requests.last?.timestamp ?? 0) &- (requests.first?.timestamp ?? 0)) / 1000
        return Report(
            trace: trace, requests: requests.count, traceSeconds: span, uniquePages: Self.uniquePages(requests),
            model: "\(options.layers) layers × \(options.kvHeads) KV heads × head dim \(options.headDim), \(options.blockTokens)-token pages",
            pageBytes: pageBytes, ramBudgetBytes: ramBudget(for: requests), diskBudgetBytes: options.diskBudgetBytes,
            diskCodec: options.diskCodec.name, heatHalfLifeMicros: options.heatHalfLifeMicros,
            minResidenceMicros: options.minResidenceMicros, timeCompression: heat.seconds > 0 ? span / heat.seconds : 0,
            heat: heat, lru: lru, ramHitRateDelta: heat.ramHitRate - lru.ramHitRate,
            hitRateDelta: (heat.ramHitRate + heat.diskHitRate) - (lru.ramHitRate + lru.diskHitRate),
            diskBytesReadDelta: heat.diskBytesRead - lru.diskBytesRead)
    }

    /// A tiered store with `policy` over a disk tier in a fresh temporary folder, removed after `body`.
    public func withStore<T>(_ policy: TieredStore.EvictionPolicy, requests: [TraceRequest], logger: Logger,
                             _ body: (TieredStore, DiskTier) async throws -> T) async throws -> T {
        let root = try Self.makeTemporaryDirectory(parent: options.parentDirectory)
        defer { try? FileManager.default.removeItem(atPath: root) }
        let selection = try BlockReaders.make(logger: logger)
        let storage = PosixStorage(root: root, reader: selection.reader, logger: logger)
        var diskConfiguration = DiskTierConfiguration()
        diskConfiguration.budgetBytes = options.diskBudgetBytes
        let disk = try DiskTier(storage: storage, configuration: diskConfiguration, logger: logger)
        let ramBudget = ramBudget(for: requests)
        var configuration = TieredStore.Configuration()
        configuration.ramBudgetBytes = ramBudget
        configuration.diskCodec = options.diskCodec
        configuration.evictionPolicy = policy
        configuration.minResidenceMicros = options.minResidenceMicros
        configuration.heatHalfLifeMicros = options.heatHalfLifeMicros
        // Room for the budget plus the largest request's pages before `makeRoom` runs.
        let largest = requests.map(\.hashIDs.count).max() ?? 1
        let arenaBytes = ramBudget + (largest + 8) * pageBytes * 2 + (64 << 20)
        configuration.arenaBytes = arenaBytes
        let name = "kvtier-trace-\(getpid())-\(policy.rawValue)"
        let store = TieredStore(configuration: configuration, disk: disk, logger: logger) { tenant in
            try ArenaPageMemory(name: "\(name)-\(tenant)", capacity: arenaBytes, stagingCapacity: 64 << 20, logger: logger)
        }
        try store.register(model)
        do {
            let value = try await body(store, disk)
            await disk.close()
            return value
        } catch {
            await disk.close()
            throw error
        }
    }

    static let tenant = TenantID(1)

    /// Replays `requests` on `store` in order and returns the figures of this replay alone
    /// (store counters are taken as differences, so a store can replay twice).
    public func replay(_ requests: [TraceRequest], on store: TieredStore, disk: DiskTier?, policy: String) async throws -> Result {
        let model = self.model
        let size = options.blockTokens
        var result = Result(policy: policy)
        let before = Self.counters(store, disk)
        let started = Clocks.monotonicNanoseconds()
        var patterns: [Int: PageBuffer] = [:]
        func pattern(_ tokens: Int) -> PageBuffer {
            if let p = patterns[tokens] { return p }
            let p = TestPattern.finiteFloat16(bytes: tokens * model.bytesPerToken, seed: UInt64(tokens))
            patterns[tokens] = p
            return p
        }
        for request in requests {
            let tokens = request.tokens(blockTokens: size)
            guard !tokens.isEmpty else { continue }
            result.requests += 1
            result.inputTokens += tokens.count
            let lookup = try store.lookup(Self.tenant, modelID: model.id, tokens: tokens)
            result.ramHitTokens += lookup.ramTokens
            result.diskHitTokens += lookup.diskTokens
            result.missTokens += tokens.count - lookup.cachedTokens
            for page in lookup.pages where page.tier == .disk {
                if let stored = disk?.page(page.address) {
                    result.diskBytesRead += stored.recordBytes
                    result.promotedBytes += stored.shape.rawBytes
                }
            }
            var dataStart = 0
            if lookup.cachedTokens > 0 {
                let got = try await store.get(Self.tenant, owner: 1, modelID: model.id, tokens: tokens, maxTokens: 0)
                dataStart = got.tokens
                try store.release(Self.tenant, leaseID: got.leaseID)
            }
            guard dataStart < tokens.count else { continue }
            func chunks(from start: Int) -> [TieredStore.PutChunk] {
                var chunks: [TieredStore.PutChunk] = []
                var at = start
                while at < tokens.count {
                    let pageEnd = min((at / size + 1) * size, tokens.count)
                    chunks.append(.bytes(pattern(pageEnd - at)))
                    at = pageEnd
                }
                return chunks
            }
            do {
                _ = try await store.put(Self.tenant, owner: 1, modelID: model.id, tokens: tokens, dataStart: dataStart,
                                        chunks: chunks(from: dataStart), durable: false)
            } catch {
                // The cached prefix shrank between get and put (a disk-budget deletion): send it all.
                result.putRetries += 1
                _ = try await store.put(Self.tenant, owner: 1, modelID: model.id, tokens: tokens, dataStart: 0,
                                        chunks: chunks(from: 0), durable: false)
            }
        }
        result.seconds = Double(Clocks.monotonicNanoseconds() - started) / 1e9
        let after = Self.counters(store, disk)
        func delta(_ name: String) -> Int { Int((after[name] ?? 0) &- (before[name] ?? 0)) }
        result.promotions = delta("promotions")
        result.evictions = delta("evictions")
        result.pagesStored = delta("pages_stored")
        result.pagesDeduplicated = delta("pages_deduplicated")
        result.diskPagesAtEnd = Int(after["disk_pages"] ?? 0)
        result.diskLiveBytesAtEnd = Int(after["disk_live_bytes"] ?? 0)
        result.diskEvictions = delta("disk_evictions")
        result.finish()
        return result
    }

    static func counters(_ store: TieredStore, _ disk: DiskTier?) -> [String: UInt64] {
        var counters = Dictionary(store.status().map { ($0.name, $0.value) }, uniquingKeysWith: { a, _ in a })
        if let disk { counters["disk_evictions"] = UInt64(disk.stats.evictions) }
        return counters
    }

    static func makeTemporaryDirectory(parent: String) throws -> String {
        var template = Array("\(parent)/kvtier-trace-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        guard made != nil else { throw TraceError.unreadable(parent, "cannot create a temporary folder there (errno \(errno))") }
        return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
