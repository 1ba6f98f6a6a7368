@preconcurrency import Glibc
import KVTierCore
import KVTierProtocol
import KVTierSystem

/// The tenant's arenas as this process maps them (the page arena read-only, the staging arena
/// read-write), shared by the client and the closures it lends pages to (so the mappings outlive
/// a `close` that races them).
// Invariant for @unchecked Sendable: the arenas are immutable and themselves Sendable; the bases
// are their mappings, which live exactly as long as this object (SharedArena unmaps in deinit).
final class MappedArena: @unchecked Sendable {
    let pages: SharedArena
    let staging: SharedArena
    /// The first byte of each mapping: `withBytes` lends one extent per closure, but a `GET`
    /// lends many pages at once. Valid while this object lives.
    private let pagesBase: UnsafeMutableRawPointer
    private let stagingBase: UnsafeMutableRawPointer

    init(pages: consuming SharedArena, staging: consuming SharedArena) {
        pagesBase = pages.withBytes(SharedArena.Extent(offset: 0, length: pages.capacity)) { $0.baseAddress! }
        stagingBase = staging.withBytes(SharedArena.Extent(offset: 0, length: staging.capacity)) { $0.baseAddress! }
        self.pages = pages
        self.staging = staging
    }

    var stagingCapacity: Int { staging.capacity }

    /// The bytes of a page extent a peer named (read-only: the mapping faults on a write), or
    /// nil when it is not inside the page arena and aligned.
    func pageBytes(offset: UInt64, length: UInt64) -> UnsafeRawBufferPointer? {
        Self.extent(offset, length, in: pages).map { UnsafeRawBufferPointer(start: pagesBase + $0.offset, count: $0.length) }
    }

    /// The bytes of a staging extent a peer named, or nil when it is not inside the staging
    /// arena and aligned.
    func stagingBytes(offset: UInt64, length: UInt64) -> UnsafeMutableRawBufferPointer? {
        Self.extent(offset, length, in: staging).map { UnsafeMutableRawBufferPointer(start: stagingBase + $0.offset, count: $0.length) }
    }

    private static func extent(_ offset: UInt64, _ length: UInt64, in arena: borrowing SharedArena) -> SharedArena.Extent? {
        guard offset <= UInt64(Int.max), length <= UInt64(Int.max) else { return nil }
        let extent = SharedArena.Extent(offset: Int(offset), length: Int(length))
        return arena.contains(extent) ? extent : nil
    }
}

/// A connection to kvtierd (docs/protocol.md). One request is in flight at a time: calls from
/// several tasks are answered one after another, in the order they reach the connection. A call
/// waits for its reply on the calling thread for up to 2 ms (a daemon answering from RAM takes
/// microseconds), then suspends while a private queue waits for the rest.
///
/// Page bytes travel through the tenant's shared arena when the daemon offers one and the
/// client maps it; otherwise inline on the socket, which gives the same bytes more slowly.
public final class KVTierClient: Sendable {
    let transport: Transport
    let arena: MappedArena?
    /// The protocol version agreed in `HELLO`.
    public let protocolVersion: UInt16
    /// The tenant the daemon placed this connection in.
    public let tenant: TenantID
    /// The daemon's limits, from `HELLO`.
    public let maxInlineBody: Int
    public let maxTokensPerRequest: Int
    /// Why page bytes travel inline although shared memory was asked for (nil when they travel
    /// through the arena, or when `mapSharedMemory` was false).
    public let sharedMemoryUnavailableReason: String?

    /// Whether page bytes travel through the shared arena.
    public var usesSharedMemory: Bool { arena != nil }

    private init(transport: Transport, hello: HelloReply, arena: MappedArena?, unavailableReason: String?) {
        self.transport = transport
        self.arena = arena
        protocolVersion = hello.version
        tenant = hello.tenant
        maxInlineBody = min(Int(hello.maxInlineBody), ProtocolLimits.maxInlineBody)
        maxTokensPerRequest = min(Int(hello.maxTokensPerRequest), ProtocolLimits.maxTokensPerRequest)
        sharedMemoryUnavailableReason = unavailableReason
    }

    /// Connects, says `HELLO` and maps the tenant's arena.
    /// - Parameters:
    ///   - socketPath: nil for the daemon's default, `KVTierPaths.defaultSocketPath()`.
    ///   - mapSharedMemory: false to move page bytes inline even when shared memory is offered.
    ///   - replyTimeoutSeconds: how long to wait for any one reply before giving the connection
    ///     up (0: forever).
    public static func connect(
        socketPath: String? = nil, clientName: String = "swift-kvtier-client", mapSharedMemory: Bool = true,
        replyTimeoutSeconds: Int = 120
    ) async throws -> KVTierClient {
        let path: String
        do { path = try socketPath ?? KVTierPaths.defaultSocketPath() } catch { throw KVTierClientError.connection("\(error)") }
        let transport = try await Transport.connect(path: path, replyTimeoutSeconds: replyTimeoutSeconds)
        do {
            let hello = Hello(capabilities: mapSharedMemory ? .sharedMemory : [], clientName: clientName)
            let exchange = try await transport.exchange(.hello(hello))
            guard case .hello(let reply) = exchange.reply else {
                Transport.closeAll(exchange.descriptors)
                throw KVTierClientError.protocolViolation("HELLO was answered with \(exchange.reply.opcode)")
            }
            guard reply.version >= ProtocolVersion.oldestSupported, reply.version <= ProtocolVersion.current else {
                Transport.closeAll(exchange.descriptors)
                throw KVTierClientError.protocolViolation("kvtierd chose protocol version \(reply.version), outside the offered "
                                                          + "\(ProtocolVersion.oldestSupported)...\(ProtocolVersion.current)")
            }
            let (arena, reason) = mapArena(reply, descriptors: exchange.descriptors, wanted: mapSharedMemory)
            return KVTierClient(transport: transport, hello: reply, arena: arena, unavailableReason: reason)
        } catch {
            await transport.close()
            throw error
        }
    }

    /// Maps the arenas a `HELLO` reply offered (the page arena read-only, insisting on its write
    /// seal; the staging arena read-write), closing the received descriptors either way.
    private static func mapArena(_ reply: HelloReply, descriptors: [Int32], wanted: Bool) -> (MappedArena?, String?) {
        defer { Transport.closeAll(descriptors) }
        guard wanted else { return (nil, nil) }
        guard reply.capabilities.contains(.sharedMemory) else { return (nil, "kvtierd offers no shared memory") }
        guard descriptors.count == 2 else { return (nil, "the HELLO reply carried \(descriptors.count) descriptors, not two") }
        guard reply.arenaBytes > 0, reply.arenaBytes <= UInt64(Int.max), reply.stagingBytes > 0, reply.stagingBytes <= UInt64(Int.max) else {
            return (nil, "the arenas are \(reply.arenaBytes) and \(reply.stagingBytes) bytes")
        }
        let pages: SharedArena
        do {
            pages = try SharedArena.map(descriptor: descriptors[0], capacity: Int(reply.arenaBytes), sharing: .clientsRead)
        } catch {
            return (nil, "cannot map the page arena (\(reply.arenaBytes) bytes) read-only with its size and write seals: \(error) (errno \(error.rawValue))")
        }
        do {
            let staging = try SharedArena.map(descriptor: descriptors[1], capacity: Int(reply.stagingBytes), sharing: .clientsWrite)
            return (MappedArena(pages: pages, staging: staging), nil)
        } catch {
            return (nil, "cannot map the staging arena (\(reply.stagingBytes) bytes) with its size seals: \(error) (errno \(error.rawValue))")
        }
    }

    /// Closes the connection; the daemon releases its leases. Calls after this fail.
    public func close() async {
        await transport.close()
    }

    // MARK: simple calls

    public func ping() async throws {
        _ = try await call(.ping, expecting: "PING") { if case .ping = $0 { () } else { nil } }
    }

    /// Registers a model (idempotent) and returns its id and page size in force.
    public func registerModel(_ spec: ModelSpecification) async throws -> RegisteredModel {
        let request: RegisterModel
        do {
            request = try RegisterModel(name: spec.name, shape: spec.shape, pageTokens: spec.pageTokens, ropeTheta: spec.ropeTheta,
                                        diskCodec: spec.diskCodec.isEmpty ? nil : spec.diskCodec)
        } catch {
            throw KVTierClientError.invalidArgument("\(error)")
        }
        let reply = try await call(.registerModel(request), expecting: "REGISTER_MODEL") { if case .registerModel(let r) = $0 { r } else { nil } }
        guard reply.pageTokens > 0, spec.pageTokens == 0 || Int(reply.pageTokens) == spec.pageTokens else {
            throw KVTierClientError.protocolViolation("REGISTER_MODEL put \(reply.pageTokens) tokens per page in force; asked for \(spec.pageTokens)")
        }
        return RegisteredModel(modelID: reply.modelID, specification: spec, pageTokens: Int(reply.pageTokens))
    }

    /// The longest cached prefix of `tokens`.
    public func lookup(_ model: RegisteredModel, tokens: [UInt32]) async throws -> LookupResult {
        let reply = try await call(.lookup(Lookup(modelID: model.modelID, tokens: tokens)), expecting: "LOOKUP") {
            if case .lookup(let r) = $0 { r } else { nil }
        }
        guard reply.cachedTokens <= tokens.count, UInt64(reply.ramTokens) + UInt64(reply.diskTokens) == UInt64(reply.cachedTokens),
              reply.vramTokens <= reply.cachedTokens else {
            throw KVTierClientError.protocolViolation("LOOKUP of \(tokens.count) tokens says \(reply.cachedTokens) cached "
                                                      + "(\(reply.ramTokens) in RAM, \(reply.diskTokens) on disk, \(reply.vramTokens) in VRAM)")
        }
        return LookupResult(cachedTokens: Int(reply.cachedTokens), ramTokens: Int(reply.ramTokens),
                            diskTokens: Int(reply.diskTokens), estimatedLoadMicros: reply.estimatedLoadMicros,
                            vramTokens: Int(reply.vramTokens))
    }

    /// Ends a lease from `GET`, `ALLOC`, `VRAM_PLACE` or `VRAM_LEASE`.
    public func release(leaseID: UInt64) async throws {
        _ = try await call(.release(Release(leaseID: leaseID)), expecting: "RELEASE") { if case .release = $0 { () } else { nil } }
    }

    /// The daemon's counters and gauges.
    public func status() async throws -> [String: UInt64] {
        let reply = try await call(.status, expecting: "STATUS") { if case .status(let r) = $0 { r } else { nil } }
        return Dictionary(reply.counters.map { ($0.name, $0.value) }, uniquingKeysWith: { _, last in last })
    }

    // MARK: sessions and attention

    /// The tenant's sessions, most recently used first, fetched `maxListEntries` at a time
    /// (at most `limit`). Where each session's pages are is `sessionInfo`'s.
    public func sessionList(limit: Int = .max) async throws -> [SessionEntry] {
        var sessions: [SessionEntry] = []
        while sessions.count < limit {
            let page = ListPage(offset: UInt32(clamping: sessions.count), limit: UInt32(min(ProtocolLimits.maxListEntries, limit - sessions.count)))
            let reply = try await call(.sessionList(page), expecting: "SESSION_LIST") { if case .sessionList(let r) = $0 { r } else { nil } }
            sessions += reply.sessions
            // The list is taken afresh for each page: stop at its end, however it changed.
            if reply.sessions.count < Int(page.limit) || sessions.count >= Int(reply.total) { break }
        }
        return sessions
    }

    public func sessionInfo(_ name: String) async throws -> KVTierSessionInfo {
        try await call(.sessionInfo(SessionName(name)), expecting: "SESSION_INFO") { if case .sessionInfo(let r) = $0 { r } else { nil } }
    }

    public func sessionPin(_ name: String, pinned: Bool = true) async throws {
        _ = try await call(.sessionPin(SessionPin(name: name, pinned: pinned)), expecting: "SESSION_PIN") {
            if case .sessionPin = $0 { () } else { nil }
        }
    }

    /// Sets a session's time to live; 0 for none.
    public func sessionTTL(_ name: String, seconds: UInt32) async throws {
        _ = try await call(.sessionTTL(SessionTTL(name: name, seconds: seconds)), expecting: "SESSION_TTL") {
            if case .sessionTTL = $0 { () } else { nil }
        }
    }

    public func sessionFork(_ from: String, to: String) async throws -> KVTierSessionInfo {
        try await call(.sessionFork(SessionFork(from: from, to: to)), expecting: "SESSION_FORK") {
            if case .sessionFork(let r) = $0 { r } else { nil }
        }
    }

    public func sessionDelete(_ name: String) async throws {
        _ = try await call(.sessionDelete(SessionName(name)), expecting: "SESSION_DELETE") { if case .sessionDelete = $0 { () } else { nil } }
    }

    /// A session's model and tokens.
    public func sessionTokens(_ name: String) async throws -> (modelID: UInt64, tokens: [UInt32]) {
        let reply = try await call(.sessionTokens(SessionName(name)), expecting: "SESSION_TOKENS") {
            if case .sessionTokens(let r) = $0 { r } else { nil }
        }
        return (reply.modelID, reply.tokens)
    }

    /// Reports the attention mass each page of `tokens` received in a step (feeds the heat score).
    public func reportAttention(_ model: RegisteredModel, tokens: [UInt32], pageMass: [Float]) async throws {
        let request = Attention(modelID: model.modelID, tokens: tokens, pageMass: pageMass)
        _ = try await call(.attention(request), expecting: "ATTENTION") { if case .attention = $0 { () } else { nil } }
    }

    /// Reports a decoding step's attention queries, `[layers, count, queryHeads, headDim]` bit
    /// patterns of the model's element type (after RoPE), for the daemon's codec policy to
    /// measure codecs with instead of the keys (docs/codecs.md, "Codec policy").
    public func reportQueries(_ model: RegisteredModel, queries: [UInt16], count: Int, queryHeads: Int) async throws {
        let shape = model.specification.shape
        guard count >= 1, count <= QuerySample.maxQueries, queryHeads >= 1, queryHeads <= Int(UInt16.max),
              queries.count == shape.layers * count * queryHeads * shape.headDim else {
            throw KVTierClientError.invalidArgument("queries must be [layers, count, queryHeads, headDim] = [\(shape.layers), 1...\(QuerySample.maxQueries), h, \(shape.headDim)]; got \(queries.count) elements for count \(count) × \(queryHeads) heads")
        }
        let request = QuerySample(modelID: model.modelID, layers: UInt16(shape.layers), queryHeads: UInt16(queryHeads),
                                  headDim: UInt16(shape.headDim), count: UInt16(count), elements: queries)
        _ = try await call(.querySample(request), expecting: "QUERY_SAMPLE") { if case .querySample = $0 { () } else { nil } }
    }

    /// One exchange whose reply must be the one `extract` accepts.
    func call<T>(_ request: Request, getInline: Bool = false, expecting name: String, _ extract: (Reply) -> T?) async throws -> T {
        let exchange = try await transport.exchange(request, getInline: getInline)
        Transport.closeAll(exchange.descriptors)
        guard let value = extract(exchange.reply) else {
            throw KVTierClientError.protocolViolation("\(name) was answered with opcode 0x\(String(exchange.reply.opcode, radix: 16))")
        }
        return value
    }
}
