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
import KVTierRemote
import KVTierStore
import KVTierSystem
import Logging

/// Restores one long prefix three ways, in one run: from the local disk tier (cold page cache),
/// from the remote tier (another host's pages in Redis: fetched, verified, decoded into RAM),
/// and, as the baseline, plain Redis reads of the very same values into memory (the store's
/// windowed GETs in its batches; also MGETs of those batches, and one GET per page). The engine of
/// `kvtier bench remote`.
///
/// Two stores in this process stand for two hosts: A puts the prefix, evicts it to its disk and
/// (remotePages "all") to Redis; B, with an empty disk, restores it from Redis. The model is
/// the fixture's (tinyllama: 6 layers × 2 KV heads × 128, float16, 6 KiB of KV per token), in
/// pages of 256 tokens. Times run from the GET's call to its lease (every page resident in the
/// tenant's shared memory); no socket hop, which the other benchmarks measure.
public struct RemoteBenchmark: Sendable {
    public static let shape = ModelShape(layers: 6, kvHeads: 2, headDim: 128, elementType: .float16)
    public static let pageTokens = 256

    public var prefixBytes = 512 << 20
    public var codec = Codec(.k4v4)
    public var rounds = 3
    /// Where the two stores' state directories and Redis's socket go.
    public var parentDirectory = "/tmp"
    /// An existing Redis to use (flushed of nothing: keys go under a random prefix); nil: start
    /// redis-server in the scratch folder.
    public var redisURL: RedisURL?

    public init() {}

    public struct Report: Codable, Sendable {
        public var codec: String
        public var pages: Int
        public var tokens: Int
        public var pageShape: String
        public var fp16Bytes: Int
        /// Bytes of the sealed values in Redis (records plus envelopes).
        public var remoteValueBytes: Int
        public var redisVersion: String?
        /// Pages per MGET (the store's batch, `TieredStore.remoteBatchBytes`, also used by the
        /// baseline).
        public var batchPages: Int
        public var diskRestoreSecondsRounds: [Double]
        public var remoteRestoreSecondsRounds: [Double]
        public var redisMGETSecondsRounds: [Double]
        /// The same values as the store asks for them: a pipeline of GETs per batch (the baseline).
        public var redisPipelinedGETSecondsRounds: [Double]
        public var redisPipelinedGETSeconds: Double
        public var redisPipelinedGETValueGBps: Double
        public var redisPipelinedGETFp16GBps: Double
        /// The same values with one GET per page, one after another.
        public var redisGETSecondsRounds: [Double]
        public var redisGETSeconds: Double
        public var redisGETValueGBps: Double
        /// Medians, and fp16 bytes delivered per second.
        public var diskRestoreSeconds: Double
        public var remoteRestoreSeconds: Double
        public var redisMGETSeconds: Double
        public var diskRestoreFp16GBps: Double
        public var remoteRestoreFp16GBps: Double
        /// Value bytes per second of the plain MGETs, and what they carry in fp16 terms.
        public var redisMGETValueGBps: Double
        public var redisMGETFp16GBps: Double
        /// Remote restore time over the pipelined GETs' (the cost of verifying and decoding).
        public var remoteVsPipelinedGET: Double
        /// The remote restore served every page, bit-identical to the disk restore's.
        public var remoteMatchesDisk: Bool
        public var ioPath: String
    }

    public func run(logger: Logger) async throws -> Report {
        let pageBytes = Self.shape.pageBytes(tokens: Self.pageTokens)
        let pages = max(1, prefixBytes / pageBytes)
        let tokens = pages * Self.pageTokens
        var template = Array("\(parentDirectory)/kvtier-bench-remote-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw ToolError("cannot make a folder in \(parentDirectory): errno \(errno)") }
        let scratch = String(cString: made)
        defer { removeTree(scratch) }
        var redisProcess: ServeChild?
        defer { _ = redisProcess?.terminate() }
        let url: RedisURL
        var version: String?
        if let redisURL {
            url = redisURL
        } else {
            let socket = scratch + "/redis.sock"
            redisProcess = try ServeChild(
                name: "redis-server", executable: try ServeBenchmark.ensureRedisServer { logger.notice("\($0)") },
                arguments: ["--port", "0", "--unixsocket", socket, "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                            "--daemonize", "no", "--dir", scratch, "--maxmemory", "0"],
                pipes: false, logPath: scratch + "/redis.log")
            version = try ServeBenchmark.waitForRedis(redisProcess!, socket: socket, log: scratch + "/redis.log")
            url = RedisURL(endpoint: .unix(path: socket))
        }
        let key = DigestKey.random()
        let prefix = "kvtier-bench-\(UInt32.random(in: 0...UInt32.max))"
        var tierConfiguration = RedisRemoteTier.Configuration(url: url, key: key)
        tierConfiguration.keyPrefix = prefix
        tierConfiguration.ttlSeconds = 3_600
        tierConfiguration.timeoutMillis = 5_000
        tierConfiguration.queueBytes = 2 * prefixBytes + (64 << 20)
        let tierA = try RedisRemoteTier(configuration: tierConfiguration, logger: logger)
        let tierB = try RedisRemoteTier(configuration: tierConfiguration, logger: logger)
        defer {
            tierA.shutdown(drainMillis: 0)
            tierB.shutdown(drainMillis: 0)
        }
        let selection = try BlockReaders.make(logger: logger)
        defer { selection.reader.close() }
        let model = ModelSpec(id: 0x7E5_7AB1E, name: "tinyllama", shape: Self.shape, pageTokens: Self.pageTokens, diskCodec: codec)
        func store(_ name: String, _ tier: RedisRemoteTier) throws -> (TieredStore, DiskTier) {
            let storage = PosixStorage(root: scratch + "/" + name, reader: selection.reader, logger: logger)
            try FileSystem.makeDirectory(scratch + "/" + name, mode: 0o700)
            let disk = try DiskTier(storage: storage, logger: logger)
            var configuration = TieredStore.Configuration()
            configuration.ramBudgetBytes = 2 * prefixBytes + (256 << 20)
            configuration.tenantRAMQuotaBytes = configuration.ramBudgetBytes
            configuration.evictionHeadroomBytes = 0
            configuration.diskCodec = codec
            let arena = TieredStore.pageArenaBytes(quota: prefixBytes + (64 << 20), ceiling: 64 << 30)
            let store = TieredStore(configuration: configuration, disk: disk, remote: RemoteAttachment(tier: tier, key: key, pages: .all),
                                    logger: logger) { tenant in
                try ArenaPageMemory(name: "kvtier-bench-\(name)-\(tenant)", capacity: arena, stagingCapacity: 1 << 20, logger: logger)
            }
            try store.register(model)
            return (store, disk)
        }
        let (a, diskA) = try store("a", tierA)
        let (b, _) = try store("b", tierB)
        let tenant = TenantID(getuid())
        var generator = SplitMix64(seed: 0x5EED_0015)
        let sequence = (0..<tokens).map { _ in UInt32(truncatingIfNeeded: generator.next() % 128_000) }

        // Host A computes the prefix, then evicts it: to its disk, and behind that to Redis.
        let chunks = (0..<pages).map { TieredStore.PutChunk.bytes(TestPattern.finiteFloat16(bytes: pageBytes, seed: UInt64($0))) }
        _ = try await a.put(tenant, owner: 1, modelID: model.id, tokens: sequence, dataStart: 0, chunks: chunks, durable: false)
        _ = try await a.evict(tenant, modelID: nil, tokens: nil, deleteFromDisk: false)
        guard tierA.drained(timeoutMillis: 600_000) else { throw ToolError("the remote tier did not take the prefix within 10 minutes") }
        let written = tierA.status().first { $0.name == "remote_writes" }?.value ?? 0
        guard written == UInt64(pages) else {
            throw ToolError("only \(written) of \(pages) pages reached Redis (\(tierA.lastError)); is maxmemory too small?")
        }

        let keys = PageKeyChain.keys(modelID: model.id, tokens: sequence, pageTokens: Self.pageTokens, wholePagesOnly: true, limit: .max)
        let redisKeys: [[UInt8]] = keys.map { Array("\(prefix):t\(tenant.rawValue):\($0)".utf8) }
        let batchPages = max(1, TieredStore.remoteBatchBytes / RemoteRecord.maxValueBytes(model))
        let baseline = try RESPConnection.connect(to: url.endpoint, timeoutMillis: 5_000)
        baseline.deadline = .never
        // The values' total size, for the baseline's buffer.
        var valueBytes = 0
        for key in redisKeys {
            guard case .integer(let length) = try baseline.command(["STRLEN", String(decoding: key, as: UTF8.self)]) else {
                throw ToolError("STRLEN failed")
            }
            valueBytes += length
        }
        let mgetBuffer = PageBuffer(byteCount: valueBytes)

        var diskRounds: [Double] = [], remoteRounds: [Double] = [], mgetRounds: [Double] = [], getRounds: [Double] = []
        var pipelineRounds: [Double] = []
        var matches = true
        for round in 0..<rounds {
            // Disk: A's RAM is empty and its segment files are out of the page cache.
            for file in try FileSystem.directoryEntries(scratch + "/a/store") where file.hasPrefix("seg-") {
                try SegmentFile(forReadingAt: .init(scratch + "/a/store/" + file), preferDirect: false).dropCachedPages()
            }
            var start = Clocks.monotonicNanoseconds()
            let fromDisk = try await a.get(tenant, owner: 2, modelID: model.id, tokens: sequence, maxTokens: 0)
            diskRounds.append(Self.seconds(since: start))
            guard fromDisk.tokens == tokens else { throw ToolError("the disk restore served \(fromDisk.tokens) of \(tokens) tokens") }

            // Remote: B holds nothing; every page comes from Redis.
            start = Clocks.monotonicNanoseconds()
            let fromRemote = try await b.get(tenant, owner: 2, modelID: model.id, tokens: sequence, maxTokens: 0)
            remoteRounds.append(Self.seconds(since: start))
            guard fromRemote.tokens == tokens else {
                throw ToolError("the remote restore served \(fromRemote.tokens) of \(tokens) tokens (\(tierB.lastError))")
            }
            if round == 0 {
                let memoryA = try a.memory(for: tenant), memoryB = try b.memory(for: tenant)
                for (pa, pb) in zip(fromDisk.pages, fromRemote.pages)
                where memcmp(memoryA.buffer(pa.extent).readOnly.baseAddress!, memoryB.buffer(pb.extent).readOnly.baseAddress!, pageBytes) != 0 {
                    matches = false
                }
            }
            try a.release(tenant, leaseID: fromDisk.leaseID)
            try b.release(tenant, leaseID: fromRemote.leaseID)
            _ = try await a.evict(tenant, modelID: nil, tokens: nil, deleteFromDisk: false)
            _ = try await b.evict(tenant, modelID: nil, tokens: nil, deleteFromDisk: true)

            // Baselines: the same values into memory, in the store's batches as it asks for them
            // (a pipeline of GETs), as MGETs, and one GET after another.
            for pipelined in [true, false] {
                start = Clocks.monotonicNanoseconds()
                var at = 0
                for first in stride(from: 0, to: pages, by: batchPages) {
                    let batch = Array(redisKeys[first..<min(pages, first + batchPages)])
                    if pipelined {
                        // As the remote tier asks (`RedisRemoteTier.fetchWindowBytes`).
                        let got = try baseline.getEach(batch.map { String(decoding: $0, as: UTF8.self) }, windowBytes: 4 << 20,
                                                       maxBytes: valueBytes) { _, length in
                            defer { at += length }
                            return UnsafeMutableRawBufferPointer(rebasing: mgetBuffer.bytes[at...])
                        }
                        guard got.allSatisfy({ if case .value = $0 { true } else { false } }) else {
                            throw ToolError("a value went missing from Redis during the run")
                        }
                    } else {
                        let lengths = try baseline.mget(keys: batch, into: UnsafeMutableRawBufferPointer(rebasing: mgetBuffer.bytes[at...]))
                        guard !lengths.contains(-1) else { throw ToolError("a value went missing from Redis during the run") }
                        at += lengths.reduce(0, +)
                    }
                }
                if pipelined { pipelineRounds.append(Self.seconds(since: start)) } else { mgetRounds.append(Self.seconds(since: start)) }
            }
            start = Clocks.monotonicNanoseconds()
            var at = 0
            for key in redisKeys {
                let length = try baseline.get(key: key, into: UnsafeMutableRawBufferPointer(rebasing: mgetBuffer.bytes[at...]))
                guard length >= 0 else { throw ToolError("a value went missing from Redis during the run") }
                at += length
            }
            getRounds.append(Self.seconds(since: start))
        }
        _ = diskA
        let disk = Self.median(diskRounds), remote = Self.median(remoteRounds), mget = Self.median(mgetRounds), get = Self.median(getRounds)
        let pipeline = Self.median(pipelineRounds)
        let fp16 = Double(pages * pageBytes)
        return Report(
            codec: codec.name, pages: pages, tokens: tokens,
            pageShape: "\(Self.shape.layers)×[\(Self.pageTokens), \(Self.shape.kvHeads), \(Self.shape.headDim)] float16",
            fp16Bytes: pages * pageBytes, remoteValueBytes: valueBytes, redisVersion: version, batchPages: batchPages,
            diskRestoreSecondsRounds: diskRounds, remoteRestoreSecondsRounds: remoteRounds, redisMGETSecondsRounds: mgetRounds,
            redisPipelinedGETSecondsRounds: pipelineRounds, redisPipelinedGETSeconds: pipeline,
            redisPipelinedGETValueGBps: Double(valueBytes) / pipeline / 1e9, redisPipelinedGETFp16GBps: fp16 / pipeline / 1e9,
            redisGETSecondsRounds: getRounds, redisGETSeconds: get, redisGETValueGBps: Double(valueBytes) / get / 1e9,
            diskRestoreSeconds: disk, remoteRestoreSeconds: remote, redisMGETSeconds: mget,
            diskRestoreFp16GBps: fp16 / disk / 1e9, remoteRestoreFp16GBps: fp16 / remote / 1e9,
            redisMGETValueGBps: Double(valueBytes) / mget / 1e9, redisMGETFp16GBps: fp16 / mget / 1e9,
            remoteVsPipelinedGET: remote / pipeline, remoteMatchesDisk: matches, ioPath: "\(selection.reader.path)")
    }

    static func seconds(since start: UInt64) -> Double { Double(Clocks.monotonicNanoseconds() - start) / 1e9 }

    static func median(_ values: [Double]) -> Double {
        let sorted = values.sorted()
        return sorted.isEmpty ? 0 : sorted[sorted.count / 2]
    }
}
