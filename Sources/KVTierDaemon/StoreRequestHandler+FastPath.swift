import KVTierCore
import KVTierProtocol
import KVTierServer
import KVTierStore

/// The requests the store can answer at once, on the connection's thread: `LOOKUP`, `RELEASE`,
/// `ALLOC`, a `GET` whose pages are all in RAM and a non-durable `PUT` of whole pages without a
/// session. Anything that may touch the disk, evict, or name a session returns nil and takes
/// `handle`, which gives the same reply.
extension StoreRequestHandler {
    public func handleImmediately(_ request: Request, context: ConnectionContext) -> Reply? {
        let tenant = context.tenant
        do throws(StoreError) {
            switch request {
            case .lookup(let r):
                return try lookup(r, context)
            case .release(let r):
                return try release(r, context)
            case .alloc(let r):
                return try alloc(r, context)
            case .get(let r):
                return try immediateGet(r, context)
            case .put(let r):
                // Sessions and durability are the async path's business.
                guard r.session.isEmpty, !r.durable, let chunks = try? chunks(of: r) else { return nil }
                guard let result = try store.putResident(tenant, owner: context.connectionID, modelID: r.modelID, tokens: r.tokens,
                                                         dataStart: Int(r.dataStart), chunks: chunks) else { return nil }
                return .put(PutReply(cachedTokens: UInt32(result.cachedTokens), newPages: UInt32(result.newPages)))
            default:
                return nil
            }
        } catch {
            return .failure(Self.wireError(error), error.description, to: request)
        }
    }

    /// `GET` of RAM-resident pages: extents for a shared-memory client, or the bytes copied into
    /// an inline reply (the lease ends with the copy).
    private func immediateGet(_ r: Get, _ context: ConnectionContext) throws(StoreError) -> Reply? {
        guard r.inline || context.sharedMemory else { return nil }
        guard r.inline else {
            guard let got = try store.getResident(context.tenant, owner: context.connectionID, modelID: r.modelID,
                                                  tokens: r.tokens, maxTokens: Int(r.maxTokens)) else { return nil }
            return .get(GetReply(tokens: UInt32(got.tokens), leaseID: got.leaseID, data: .extents(got.pages.map {
                WireExtent(offset: UInt64($0.extent.offset), bytes: UInt64($0.extent.length), tokens: UInt32($0.tokens))
            })))
        }
        // An inline reply must fit one frame: serve whole pages up to the limit.
        guard let model = try? store.model(r.modelID) else { return nil }
        let pageBytes = model.pageTokens * model.bytesPerToken
        let fitting = max(1, (ProtocolLimits.maxInlineBody - 64) / max(1, pageBytes)) * model.pageTokens
        let maxTokens = r.maxTokens == 0 ? fitting : min(Int(r.maxTokens), fitting)
        guard let got = try store.getResident(context.tenant, owner: context.connectionID, modelID: r.modelID,
                                              tokens: r.tokens, maxTokens: maxTokens) else { return nil }
        let memory = try store.memory(for: context.tenant)
        let total = got.pages.reduce(0) { $0 + $1.tokens * model.bytesPerToken }
        let bytes = [UInt8](unsafeUninitializedCapacity: total) { buffer, count in
            var at = 0
            for page in got.pages {
                let length = page.tokens * model.bytesPerToken
                UnsafeMutableRawBufferPointer(rebasing: UnsafeMutableRawBufferPointer(buffer)[at..<at + length])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: memory.buffer(page.extent).readOnly[0..<length]))
                at += length
            }
            count = at
        }
        try store.release(context.tenant, leaseID: got.leaseID)
        return .get(GetReply(tokens: UInt32(got.tokens), leaseID: 0, data: .inline(bytes)))
    }
}
