import KVTierCodec
import KVTierCore
import Synchronization

extension TieredStore {
    /// One page of a tenant as `kvtier pages` shows it.
    public struct PageSummary: Sendable, Equatable {
        public var address: PageAddress
        public var modelID: UInt64
        public var tokens: Int
        public var inRAM: Bool
        public var onDisk: Bool
        public var hold: SessionCatalog.Hold
        public var leases: Int
        /// Heat now (RAM), or as remembered from its eviction (disk only).
        public var heat: Double
        /// Codec and record bytes of its disk copy, when it has one.
        public var diskCodec: Codec?
        public var storedBytes: Int
        /// Bytes of its 16-bit KV.
        public var rawBytes: Int
        public var idleMicros: UInt64
    }

    /// The tenant's pages (of one model, or all with nil): RAM pages hottest first, then pages
    /// only on disk, most recently used first.
    public func pageSummaries(_ tenant: TenantID, modelID: UInt64?) -> [PageSummary] {
        let onDisk = disk?.pages().filter { $0.address.tenant == tenant && (modelID == nil || $0.modelID == modelID) } ?? []
        let diskByAddress = Dictionary(onDisk.map { ($0.address, $0) }, uniquingKeysWith: { a, _ in a })
        let now = Clocks.monotonicMicros()
        let wallNow = Clocks.wallMicros()
        let (ram, remembered) = state.withLock { s -> ([(PageAddress, Resident, Int)], [PageAddress: Double]) in
            let ram = s.resident.filter { $0.key.tenant == tenant && (modelID == nil || $0.value.modelID == modelID) }
                .map { ($0.key, $0.value, s.models[$0.value.modelID]?.bytesPerToken ?? 0) }
            return (ram, s.evictedHeat.filter { diskByAddress[$0.key] != nil })
        }
        var summaries = ram.map { address, page, bytesPerToken in
            let stored = diskByAddress[address]
            return PageSummary(address: address, modelID: page.modelID, tokens: page.tokens, inRAM: true, onDisk: stored != nil,
                               hold: catalog.hold(on: address), leases: page.leases, heat: heat(page, now: now), diskCodec: stored?.codec,
                               storedBytes: stored?.recordBytes ?? 0, rawBytes: page.tokens * bytesPerToken,
                               idleMicros: now &- min(now, page.lastAccessMicros))
        }
        summaries.sort { $0.heat > $1.heat }
        let inRAM = Set(ram.map(\.0))
        summaries += onDisk.filter { !inRAM.contains($0.address) }
            .sorted { $0.lastAccessMicros > $1.lastAccessMicros }
            .map { stored in
                PageSummary(address: stored.address, modelID: stored.modelID, tokens: stored.shape.tokens, inRAM: false, onDisk: true,
                            hold: catalog.hold(on: stored.address), leases: 0, heat: remembered[stored.address] ?? 0,
                            diskCodec: stored.codec, storedBytes: stored.recordBytes, rawBytes: stored.shape.rawBytes,
                            idleMicros: wallNow &- min(wallNow, stored.lastAccessMicros))
            }
        return summaries
    }

    /// `evict` of a session's pages. Reading the session here is not a use of it: its TTL
    /// keeps counting and nothing is prefetched.
    public func evictSession(_ tenant: TenantID, name: String, deleteFromDisk: Bool) async throws(StoreError) -> EvictResult {
        let id = SessionID(tenant: tenant, name: name)
        guard let session = catalog.session(id) else { throw SessionCatalog.missing(id) }
        return try await evict(tenant, modelID: session.modelID, tokens: session.tokens, deleteFromDisk: deleteFromDisk)
    }

    public struct EvictResult: Sendable, Equatable {
        /// Pages moved out of RAM (written to disk first unless deleted).
        public var evicted = 0
        /// Pages deleted from disk.
        public var deleted = 0
        /// Pages left alone: leased by a client, or held by a pinned session.
        public var skipped = 0
    }

    /// Moves pages out of RAM now, as an operator asks (`kvtier evict`): the cached prefix of
    /// `tokens`, or with `tokens` nil every page of the tenant (and model, unless nil). With
    /// `deleteFromDisk` they leave the disk tier too. Leased pages and pinned sessions' pages
    /// stay.
    public func evict(_ tenant: TenantID, modelID: UInt64?, tokens: [UInt32]?, deleteFromDisk: Bool) async throws(StoreError) -> EvictResult {
        let addresses: [PageAddress]
        if let tokens {
            guard let modelID else { throw .invalidArgument("evicting a token sequence needs its model") }
            addresses = locate(tenant, try model(modelID), tokens).map(\.address)
        } else {
            addresses = pageSummaries(tenant, modelID: modelID).map(\.address)
        }
        var result = EvictResult()
        for address in addresses {
            if catalog.hold(on: address) == .pinned {
                result.skipped += 1
                continue
            }
            let resident = state.withLock { $0.resident[address] }
            if let resident {
                if resident.leases > 0 {
                    result.skipped += 1
                    continue
                }
                if !deleteFromDisk && needsWrite(resident, address) { try await persist(address) }
                guard evictFromRAM(address, requiringDiskCopy: !deleteFromDisk) else {
                    result.skipped += 1  // leased meanwhile
                    continue
                }
                result.evicted += 1
            }
            if deleteFromDisk, let disk {
                do {
                    if try await disk.delete(address) { result.deleted += 1 }
                } catch {
                    throw .unavailable("cannot delete page \(address) from disk: \(error)")
                }
            }
        }
        return result
    }
}

extension TieredStore {
    /// Writes every RAM page that is not on disk yet, hottest first so that a deadline cuts the
    /// least useful; stops at `deadlineMicros` (monotonic). Used on a clean
    /// stop, so a restart finds the whole cache. Returns pages written and pages left unwritten.
    public func persistResident(deadlineMicros: UInt64) async -> (written: Int, left: Int) {
        let now = Clocks.monotonicMicros()
        let pending = state.withLock { s in
            s.resident.map { ($0.key, $0.value, heat($0.value, now: now)) }
        }.filter { needsWrite($0.1, $0.0) }.sorted { $0.2 > $1.2 }.map(\.0)
        // In groups of `evictionGroupPages`, one group commit each (not one fdatasync per page),
        // the deadline checked between groups.
        var written = 0
        for start in stride(from: 0, to: pending.count, by: Self.evictionGroupPages) {
            guard Clocks.monotonicMicros() < deadlineMicros else { return (written, pending.count - start) }
            let group = Array(pending[start..<min(start + Self.evictionGroupPages, pending.count)])
            for (address, result) in zip(group, await persist(group)) {
                guard case .failure(let error) = result else {
                    written += 1
                    continue
                }
                logger.warning("cannot write a RAM page to disk at shutdown", metadata: ["page": "\(address)", "error": "\(error)"])
                return (written, pending.count - written)
            }
        }
        return (written, 0)
    }
}
