import KVTierCore
import KVTierProtocol
import KVTierServer
import KVTierStore

/// The VRAM tier's requests (docs/protocol.md, "VRAM tier"): pools of GPU memory in clients,
/// described to the daemon's `VramDirectory`, which places and leases copies of the pages the
/// store holds. Every request is answered at once: the directory only keeps books.
extension StoreRequestHandler {
    /// The directory's view of a located prefix.
    static func vramPages(_ pages: [TieredStore.PageRef]) -> [VramDirectory.Page] {
        pages.map { VramDirectory.Page(address: $0.address, tokens: $0.tokens.count) }
    }

    func vramPool(_ r: VramPool, _ context: ConnectionContext) throws(StoreError) -> Reply {
        let id = try vram.registerPool(context.tenant, owner: context.connectionID, deviceUUID: r.deviceUUID, slots: Int(r.slots),
                                       slotBytes: r.slotBytes, handle: r.handle)
        return .vramPool(VramPoolReply(poolID: id))
    }

    func vramPlace(_ r: VramPlace, _ context: ConnectionContext) throws(StoreError) -> Reply {
        let model = try store.model(r.modelID)
        let pageBytes = model.pageTokens * model.bytesPerToken
        // The pool first: an unknown pool or one sized for another model costs no locate.
        try vram.checkPool(context.tenant, r.poolID, pageBytes: pageBytes)
        let pages = try store.cachedPages(context.tenant, modelID: r.modelID, tokens: r.tokens)
        let placement = try vram.place(context.tenant, owner: context.connectionID, poolID: r.poolID, pages: Self.vramPages(pages),
                                       pageBytes: pageBytes)
        return .vramPlace(VramPlaceReply(leaseID: placement.leaseID, residentTokens: UInt32(placement.residentTokens),
                                         pages: placement.reserved.map {
                                             VramPlacedPage(pageIndex: UInt32($0.pageIndex), tokens: UInt32($0.tokens), slot: UInt32($0.slot))
                                         }))
    }

    func vramLease(_ r: VramLease, _ context: ConnectionContext) throws(StoreError) -> Reply {
        let pages = try store.cachedPages(context.tenant, modelID: r.modelID, tokens: r.tokens)
        guard let lent = try vram.lease(context.tenant, owner: context.connectionID, pages: Self.vramPages(pages)) else {
            return .vramLease(.none)
        }
        let pool = lent.pool
        return .vramLease(VramLeaseReply(poolID: pool.id, deviceUUID: pool.deviceUUID, slots: UInt32(pool.slots), slotBytes: pool.slotBytes,
                                         handle: pool.handle, leaseID: lent.leaseID, tokens: UInt32(lent.tokens),
                                         pages: lent.pages.map { VramLeasedPage(tokens: UInt32($0.tokens), slot: UInt32($0.slot)) }))
    }
}
