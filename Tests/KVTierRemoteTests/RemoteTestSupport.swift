@preconcurrency import Glibc
import KVTierCodec
import KVTierCore
import KVTierIO
import KVTierRemote
import KVTierStore
import KVTierStoreTesting
import KVTierSystem
import KVTierTestProcess
import Logging

let quietLogger: Logger = {
    var logger = Logger(label: "kvtier.remote-test")
    logger.logLevel = .critical
    return logger
}()

/// Why the tests that need a real server skip here (nil: they run).
let redisMissing = RedisServer.unavailableReason != nil

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// A small model whose pages are stored losslessly (fp16), so remote hits compare bit for bit.
let testModel = ModelSpec(id: 0x5EED, name: "remote-test", layers: 2, kvHeads: 2, headDim: 32, elementType: .float16,
                          pageTokens: 16, diskCodec: Codec(.fp16))
let alice = TenantID(1000)
let bob = TenantID(1001)

/// Finite float16 values from a seed (every bit pattern but infinities and NaNs' exponent).
func pattern(bytes: Int, seed: UInt64) -> PageBuffer {
    let buffer = PageBuffer(overwrittenByteCount: bytes)
    var generator = SplitMix64(seed: seed)
    let halves = buffer.bytes.bindMemory(to: UInt16.self)
    for i in 0..<bytes / 2 { halves[i] = UInt16(truncatingIfNeeded: generator.next()) & ~0x4000 }
    return buffer
}

/// A whole page of `testModel` for `address`, encoded as the disk tier would, and its bytes.
func pageRecord(_ address: PageAddress, seed: UInt64, model: ModelSpec = testModel) throws -> (record: [UInt8], data: [UInt8]) {
    let shape = model.pageShape(tokens: model.pageTokens)
    let data = pattern(bytes: shape.rawBytes, seed: seed)
    let record = try PageRecord.encode(address: address, modelID: model.id, codec: Codec(.fp16), shape: shape, data: data.readOnly,
                                       createdMicros: 1)
    return (record, data.copyBytes())
}

func address(_ tenant: TenantID, _ n: UInt64) -> PageAddress { PageAddress(tenant: tenant, key: PageKey(high: 0xFEED, low: n)) }

/// A tier on `server`'s Unix socket.
func makeTier(_ server: RedisServer, key: DigestKey, _ configure: (inout RedisRemoteTier.Configuration) -> Void = { _ in }) throws -> RedisRemoteTier {
    var configuration = RedisRemoteTier.Configuration(url: RedisURL(endpoint: .unix(path: server.socketPath)), key: key)
    configure(&configuration)
    return try RedisRemoteTier(configuration: configuration, logger: quietLogger)
}

/// A plain connection to `server`, for looking at what the tier stored (and for forging). No
/// deadline: under a loaded full-suite run a test can take longer than any fixed one.
func inspect(_ server: RedisServer) throws -> RESPConnection {
    let connection = try RESPConnection.connect(to: .unix(path: server.socketPath), timeoutMillis: 10_000)
    connection.deadline = .never
    return connection
}

// Calls that block (a server's start, network waits, the writer's drain) run on threads of their
// own, never on the cooperative pool: two threads on two cores, and a test holding one starved
// every other suite's tasks in a loaded full run (docs/testing.md).

/// `body` on a thread of its own.
func offPool<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
    await EventWaits.onThread(body)
}

/// A started redis-server, its start (and its wait for READY=1) off the pool.
func startRedis(tcpPort: UInt16? = nil, extraArguments: [String] = []) async throws -> RedisServer {
    try await offPool { Result { () throws(ProcessFailure) in try RedisServer(tcpPort: tcpPort, extraArguments: extraArguments) } }.get()
}

extension RedisServer {
    func restart() async throws {
        try await offPool { Result { () throws(ProcessFailure) in try self.start() } }.get()
    }
}

extension RedisRemoteTier {
    func drainedOffPool(timeoutMillis: Int) async -> Bool { await offPool { self.drained(timeoutMillis: timeoutMillis) } }
    func containsOffPool(_ addresses: [PageAddress]) async -> [Bool] { await offPool { self.contains(addresses) } }
    func fetchOffPool(_ addresses: [PageAddress], maxValueBytes: Int) async -> [RemoteValue?] {
        await offPool { self.fetch(addresses, maxValueBytes: maxValueBytes) }
    }
}

extension TieredStore {
    func lookupOffPool(_ tenant: TenantID, _ tokens: [UInt32]) async throws -> LookupResult {
        try await offPool { Result { () throws(StoreError) in try self.lookup(tenant, modelID: testModel.id, tokens: tokens) } }.get()
    }
}

/// Blocking `body` on a thread of its own, and the milliseconds it took there.
func timedOffPool<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> (millis: Int, value: T) {
    await offPool {
        let start = Deadline(millisFromNow: 0).nanoseconds
        let value = body()
        return (Int((Deadline(millisFromNow: 0).nanoseconds - start) / 1_000_000), value)
    }
}

func counter(_ status: [(name: String, value: UInt64)], _ name: String) -> UInt64? {
    status.first { $0.name == name }?.value
}


/// A store on simulated storage with real shared memory, attached to `remote`.
func makeStore(remote: RemoteAttachment?, ramBudget: Int = 64 << 20, diskBudget: Int? = nil, seed: UInt64) throws -> TieredStore {
    var diskConfiguration = DiskTierConfiguration()
    diskConfiguration.budgetBytes = diskBudget
    diskConfiguration.segmentBytes = 1 << 20
    let disk = try DiskTier(storage: SimulatedStorage(seed: seed), configuration: diskConfiguration, logger: quietLogger)
    var configuration = TieredStore.Configuration()
    configuration.ramBudgetBytes = ramBudget
    configuration.tenantRAMQuotaBytes = ramBudget
    configuration.minResidenceMicros = 0
    configuration.arenaBytes = 128 << 20
    let name = "kvtier-remote-test-\(seed)"
    let store = TieredStore(configuration: configuration, disk: disk, remote: remote, logger: quietLogger) { tenant in
        try ArenaPageMemory(name: "\(name)-\(tenant)", capacity: 128 << 20, stagingCapacity: 16 << 20, logger: quietLogger)
    }
    try store.register(testModel)
    return store
}

/// Token ids of a sequence, and its KV in page layout, page by page.
struct TestSequence {
    let tokens: [UInt32]
    let seed: UInt64

    init(pages: Int, seed: UInt64) {
        var generator = SplitMix64(seed: seed)
        tokens = (0..<pages * testModel.pageTokens).map { _ in UInt32(truncatingIfNeeded: generator.next() % 50_000) }
        self.seed = seed
    }

    func page(_ index: Int) -> PageBuffer {
        pattern(bytes: testModel.pageTokens * testModel.bytesPerToken, seed: seed &* 1_000 &+ UInt64(index))
    }

    var chunks: [TieredStore.PutChunk] { (0..<tokens.count / testModel.pageTokens).map { .bytes(page($0)) } }

    /// The bytes a GET of the whole sequence must serve.
    var bytes: [UInt8] { (0..<tokens.count / testModel.pageTokens).flatMap { page($0).copyBytes() } }
}

/// GETs `tokens` from `store` for `tenant`; the tokens served and their bytes (lease released).
func fetchAll(_ store: TieredStore, _ tenant: TenantID, _ tokens: [UInt32]) async throws -> (tokens: Int, bytes: [UInt8]) {
    let got = try await store.get(tenant, owner: 1, modelID: testModel.id, tokens: tokens, maxTokens: 0)
    let memory = try store.memory(for: tenant)
    var bytes: [UInt8] = []
    for page in got.pages { bytes += memory.buffer(page.extent).readOnly[0..<page.tokens * testModel.bytesPerToken] }
    try store.release(tenant, leaseID: got.leaseID)
    return (got.tokens, bytes)
}
