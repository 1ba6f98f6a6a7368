import KVTierProtocol

/// The VRAM tier's directory (docs/vram-tier.md, docs/protocol.md "VRAM tier"). The pool's memory
/// is the caller's (GPU memory it exported, e.g. through CUDA IPC); kvtierd only keeps books of
/// which page is in which slot. A pool lives as long as the connection that registered it.
extension KVTierClient {
    /// Registers a pool of `slots` slots of `slotBytes` bytes on the device `deviceUUID` and
    /// returns its id; `handle` is what the tenant's other processes map it with (opaque to the
    /// daemon, 1 to 1024 bytes). Closing this connection ends the pool.
    public func vramRegisterPool(deviceUUID: String, slots: Int, slotBytes: Int, handle: [UInt8]) async throws -> UInt32 {
        guard let slots = UInt32(exactly: slots), let slotBytes = UInt64(exactly: slotBytes) else {
            throw KVTierClientError.invalidArgument("a VRAM pool has 1 to \(ProtocolLimits.maxVramSlots) slots of 1 to \(ProtocolLimits.maxVramSlotBytes) bytes")
        }
        let request = VramPool(deviceUUID: deviceUUID, slots: slots, slotBytes: slotBytes, handle: handle)
        let reply = try await call(.vramPool(request), expecting: "VRAM_POOL") { if case .vramPool(let r) = $0 { r } else { nil } }
        guard reply.poolID != 0 else { throw KVTierClientError.protocolViolation("VRAM_POOL reply: pool id 0") }
        return reply.poolID
    }

    /// Reserves slots of pool `poolID` for the cached pages of `tokens` it lacks. Write each
    /// page into its slot, then `vramCommit(leaseID:)`; `release(leaseID:)` gives them back.
    public func vramPlace(_ model: RegisteredModel, poolID: UInt32, tokens: [UInt32]) async throws -> VramPlaceReply {
        let reply = try await call(.vramPlace(VramPlace(modelID: model.modelID, poolID: poolID, tokens: tokens)), expecting: "VRAM_PLACE") {
            if case .vramPlace(let r) = $0 { r } else { nil }
        }
        let size = model.pageTokens
        let fits = reply.pages.allSatisfy { page in
            page.tokens > 0 && Int(page.tokens) <= size && Int(page.pageIndex) * size + Int(page.tokens) <= tokens.count
                && Int(page.pageIndex) * size >= Int(reply.residentTokens)
        }
        guard fits, (reply.leaseID == 0) == reply.pages.isEmpty, Int(reply.residentTokens) <= tokens.count else {
            throw KVTierClientError.protocolViolation("VRAM_PLACE reply: lease \(reply.leaseID), \(reply.pages.count) pages, \(reply.residentTokens) resident, for \(tokens.count) tokens")
        }
        return reply
    }

    /// The pages of a `vramPlace` lease are written: they become resident.
    public func vramCommit(leaseID: UInt64) async throws {
        _ = try await call(.vramCommit(VramCommit(leaseID: leaseID)), expecting: "VRAM_COMMIT") { if case .vramCommit = $0 { () } else { nil } }
    }

    /// The leading pages of the cached prefix of `tokens` resident in one pool of the tenant,
    /// under a lease (`release(leaseID:)` when copied), and the pool to map. `poolID` 0: none.
    public func vramLease(_ model: RegisteredModel, tokens: [UInt32]) async throws -> VramLeaseReply {
        let reply = try await call(.vramLease(VramLease(modelID: model.modelID, tokens: tokens)), expecting: "VRAM_LEASE") {
            if case .vramLease(let r) = $0 { r } else { nil }
        }
        let size = model.pageTokens
        let served = reply.pages.reduce(0) { $0 + Int($1.tokens) }
        let shaped = reply.pages.dropLast().allSatisfy { Int($0.tokens) == size }
            && reply.pages.last.map { $0.tokens > 0 && Int($0.tokens) <= size } ?? true
        guard shaped, served == Int(reply.tokens), served <= tokens.count, (reply.leaseID == 0) == (served == 0),
              reply.pages.allSatisfy({ $0.slot < reply.slots }) else {
            throw KVTierClientError.protocolViolation("VRAM_LEASE reply: \(reply.tokens) tokens in \(reply.pages.count) pages of a \(reply.slots)-slot pool, lease \(reply.leaseID), for \(tokens.count) tokens")
        }
        return reply
    }

    /// Takes pool `poolID` (registered on this connection) out of the directory and returns the
    /// reader leases still on it; free the pool's memory once this returns 0.
    public func vramDrop(poolID: UInt32) async throws -> Int {
        let reply = try await call(.vramDrop(VramDrop(poolID: poolID)), expecting: "VRAM_DROP") {
            if case .vramDrop(let r) = $0 { r } else { nil }
        }
        return Int(reply.readers)
    }
}
