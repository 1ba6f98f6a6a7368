import KVTierCore
import KVTierProtocol
import KVTierServer
import KVTierStore

/// The requests the store can answer at once, on the connection's thread: `LOOKUP`, `RELEASE`,
/// `ALLOC`, `SESSION_LIST`, `MODELS`, a `GET` whose pages are all in RAM and a non-durable `PUT` of whole pages without a
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
            case .sessionList(let r):
                // Waits on nothing: answered here, so listers never occupy the task pool that
                // other tenants' durable puts need.
                return sessionList(r, context)
            case .models(let r):
                return models(r, context)
            case .get(let r):
                return try immediateGet(r, context)
            case .put(let r):
                // Sessions and durability are the async path's business.
                guard r.session.isEmpty, !r.durable, let chunks = try? chunks(of: r, tenant: tenant) else { return nil }
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
        guard r.inline || context.sharedMemory, let model = try? store.model(r.modelID) else { return nil }
        let maxTokens = r.inline ? Self.inlineLimit(model, requested: r.maxTokens) : Int(r.maxTokens)
        guard let got = try store.getResident(context.tenant, owner: context.connectionID, modelID: r.modelID,
                                              tokens: r.tokens, maxTokens: maxTokens) else { return nil }
        return try getReply(got, model, inline: r.inline, context)
    }
}
