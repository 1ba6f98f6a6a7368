import KVTierCodec
import KVTierCore
import KVTierProtocol
import KVTierServer
import KVTierStore

/// The daemon's request semantics: wire requests onto the tiered store.
public struct StoreRequestHandler: RequestHandler {
    let store: TieredStore
    let defaultPageTokens: Int

    public init(store: TieredStore, defaultPageTokens: Int) {
        self.store = store
        self.defaultPageTokens = defaultPageTokens
    }

    public func handle(_ request: Request, context: ConnectionContext) async -> Reply {
        do {
            return try await reply(to: request, context)
        } catch {
            return .failure(Self.wireError(error), error.description, to: request)
        }
    }

    public func connectionClosed(_ context: ConnectionContext) async {
        store.releaseAll(owner: context.connectionID)
    }

    static func wireError(_ error: StoreError) -> WireError {
        switch error {
        case .unknownModel, .notFound: .notFound
        case .invalidArgument: .invalidArgument
        case .overBudget: .overBudget
        case .unavailable: .unavailable
        }
    }

    private func reply(to request: Request, _ context: ConnectionContext) async throws(StoreError) -> Reply {
        let tenant = context.tenant
        switch request {
        case .hello, .ping:
            throw .invalidArgument("HELLO and PING are answered by the server")
        case .registerModel(let r):
            let pageTokens = r.pageTokens == 0 ? UInt16(clamping: defaultPageTokens) : r.pageTokens
            let id: UInt64
            do { id = try r.modelID(pageTokensInForce: pageTokens) } catch { throw .invalidArgument("\(error)") }
            try store.register(ModelSpec(id: id, name: r.name, layers: Int(r.layers), kvHeads: Int(r.kvHeads), headDim: Int(r.headDim),
                                         elementType: r.elementType, pageTokens: Int(pageTokens)))
            return .registerModel(RegisterModelReply(modelID: id, pageTokens: pageTokens))
        case .lookup(let r):
            let found = try store.lookup(tenant, modelID: r.modelID, tokens: r.tokens)
            return .lookup(LookupReply(cachedTokens: UInt32(found.cachedTokens), ramTokens: UInt32(found.ramTokens),
                                       diskTokens: UInt32(found.diskTokens), estimatedLoadMicros: found.estimatedLoadMicros))
        case .put(let r):
            guard r.session.isEmpty else {
                throw .invalidArgument("named sessions are not supported by this kvtierd yet: put without a session")
            }
            let chunks = try chunks(of: r)
            let result = try await store.put(tenant, owner: context.connectionID, modelID: r.modelID, tokens: r.tokens,
                                             dataStart: Int(r.dataStart), chunks: chunks, durable: r.durable)
            return .put(PutReply(cachedTokens: UInt32(result.cachedTokens), newPages: UInt32(result.newPages)))
        case .get(let r):
            guard r.inline || context.sharedMemory else {
                throw .invalidArgument("this connection has no shared memory: send GET with the inline flag")
            }
            var maxTokens = Int(r.maxTokens)
            if r.inline {
                // An inline reply must fit one frame: serve whole pages up to the limit.
                let model = try store.model(r.modelID)
                let pageBytes = model.pageTokens * model.bytesPerToken
                let fitting = max(1, (ProtocolLimits.maxInlineBody - 64) / max(1, pageBytes)) * model.pageTokens
                maxTokens = maxTokens == 0 ? fitting : min(maxTokens, fitting)
            }
            let got = try await store.get(tenant, owner: context.connectionID, modelID: r.modelID, tokens: r.tokens, maxTokens: maxTokens)
            guard r.inline else {
                return .get(GetReply(tokens: UInt32(got.tokens), leaseID: got.leaseID, data: .extents(got.pages.map {
                    WireExtent(offset: UInt64($0.extent.offset), bytes: UInt64($0.extent.length), tokens: UInt32($0.tokens))
                })))
            }
            // Inline: copy the pages out, then the lease is not needed.
            let model = try store.model(r.modelID)
            let memory = try store.memory(for: tenant)
            var bytes: [UInt8] = []
            bytes.reserveCapacity(got.pages.reduce(0) { $0 + $1.tokens * model.bytesPerToken })
            for page in got.pages {
                bytes += memory.buffer(page.extent).readOnly[0..<page.tokens * model.bytesPerToken]
            }
            try store.release(tenant, leaseID: got.leaseID)
            return .get(GetReply(tokens: UInt32(got.tokens), leaseID: 0, data: .inline(bytes)))
        case .release(let r):
            try store.release(tenant, leaseID: r.leaseID)
            return .release
        case .alloc(let r):
            let (lease, extents) = try store.allocate(tenant, owner: context.connectionID, sizes: r.byteCounts.map { Int(clamping: $0) })
            return .alloc(AllocReply(leaseID: lease, extents: extents.map { WireExtent(offset: UInt64($0.offset), bytes: UInt64($0.length), tokens: 0) }))
        case .attention(let r):
            try store.reportAttention(tenant, modelID: r.modelID, tokens: r.tokens, masses: r.pageMass)
            return .attention
        case .status:
            return .status(StatusReply(counters: store.status().map { StatusCounter(name: $0.name, value: $0.value) }))
        case .sessionList, .sessionInfo, .sessionPin, .sessionTTL, .sessionFork, .sessionDelete, .sessionTokens:
            throw .invalidArgument("named sessions are not supported by this kvtierd yet")
        }
    }

    /// The store's chunks for a put: arena extents as named, or inline bytes cut at page
    /// boundaries (docs/protocol.md, PUT).
    func chunks(of put: Put) throws(StoreError) -> [TieredStore.PutChunk] {
        switch put.data {
        case .extents(let extents):
            return extents.map { .extent(Extent(offset: Int($0.offset), length: Int(clamping: $0.bytes))) }
        case .inline(let bytes):
            let model = try store.model(put.modelID)
            var chunks: [TieredStore.PutChunk] = []
            var token = Int(put.dataStart)
            var at = 0
            while token < put.tokens.count {
                let end = min((token / model.pageTokens + 1) * model.pageTokens, put.tokens.count)
                let length = (end - token) * model.bytesPerToken
                guard at + length <= bytes.count else {
                    throw .invalidArgument("inline data holds \(bytes.count) bytes; tokens \(put.dataStart)..<\(put.tokens.count) need more")
                }
                let chunk = PageBuffer(overwrittenByteCount: length)
                bytes.withUnsafeBytes { chunk.bytes.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[at..<at + length])) }
                chunks.append(.bytes(chunk))
                at += length
                token = end
            }
            guard at == bytes.count else { throw .invalidArgument("inline data holds \(bytes.count - at) bytes more than the tokens need") }
            return chunks
        }
    }
}
