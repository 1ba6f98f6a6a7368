import KVTierCore
import Synchronization

extension TieredStore {
    public struct ServedPage: Sendable, Equatable {
        public var extent: Extent
        /// Tokens the page holds (its layout); the reply's `tokens` says how many are served.
        public var tokens: Int
    }

    public struct GetResult: Sendable, Equatable {
        public var tokens: Int
        public var leaseID: UInt64
        public var pages: [ServedPage]
    }

    /// Leases the pages of the longest cached prefix of `tokens` (up to `maxTokens`, 0 for all),
    /// promoting disk pages into the tenant's memory first. A page that fails to load ends the
    /// prefix there: the client gets fewer tokens, never wrong ones.
    public func get(_ tenant: TenantID, owner: UInt64, modelID: UInt64, tokens: [UInt32], maxTokens: Int) async throws(StoreError) -> GetResult {
        try await beginGet(tenant, owner: owner, modelID: modelID, tokens: tokens, maxTokens: maxTokens).value()
    }

    /// A `GET`, planned once: the chain is hashed once, and when every page of the served prefix
    /// is in RAM they are leased under the same lock that finds them (`done`). Otherwise the plan
    /// (one `locate`) goes to the `pending` work, which loads disk pages and leases what it can.
    public func beginGet(_ tenant: TenantID, owner: UInt64, modelID: UInt64, tokens: [UInt32], maxTokens: Int) throws(StoreError) -> Outcome<GetResult> {
        let (found, existing) = state.withLock { s in (s.models[modelID], s.memories[tenant]) }
        guard let model = found else { throw .unknownModel(modelID) }
        let memory: any PageMemory
        if let existing { memory = existing } else { memory = try self.memory(for: tenant) }
        let size = model.pageTokens
        let keys = Self.wholePageKeys(model, tokens, limit: maxTokens > 0 ? (maxTokens + size - 1) / size : .max)
        // Whole pages only, all resident: the common case needs no search for a partial page.
        let wantsPartial = keys.count * size < tokens.count && (maxTokens == 0 || keys.count * size < maxTokens)
        if !wantsPartial, !keys.isEmpty {
            let pages = keys.enumerated().map { index, key in
                PageRef(address: PageAddress(tenant: tenant, key: key), tokens: index * size..<(index + 1) * size, tier: .ram)
            }
            if let result = try leaseIfResident(tenant, owner: owner, pages, maxTokens: maxTokens) { return .done(result) }
        }
        let located = locate(tenant, model, tokens, keys: keys, partialBefore: maxTokens > 0 ? maxTokens : .max)
        // Pages past the local prefix may be in the remote tier: the pending work asks it.
        let remoteCandidates = remoteCandidates(tenant, model, keys: keys, located: located)
        if remoteCandidates.isEmpty, located.allSatisfy({ $0.tier == .ram }),
           let result = try leaseIfResident(tenant, owner: owner, located, maxTokens: maxTokens) {
            return .done(result)
        }
        return .pending { [self] () async throws(StoreError) -> GetResult in
            try await finishGet(tenant, owner: owner, model, memory, located, remoteCandidates: remoteCandidates, maxTokens: maxTokens)
        }
    }

    /// A GET of chosen whole pages of `tokens` (`indices`, increasing) instead of its cached
    /// prefix: what an offloading client asks for when a step needs cold pages. The pages are
    /// found by their keys alone (a page's key fixes its tokens and all before them), so pages
    /// between them need not be cached. Serves the leading pages of `indices` that are stored
    /// and fit the tenant's quota; `tokens` of the result is their count times the page size.
    public func beginGetPages(_ tenant: TenantID, owner: UInt64, modelID: UInt64, tokens: [UInt32],
                              pages indices: [Int]) throws(StoreError) -> Outcome<GetResult> {
        let (found, existing) = state.withLock { s in (s.models[modelID], s.memories[tenant]) }
        guard let model = found else { throw .unknownModel(modelID) }
        let size = model.pageTokens
        guard let last = indices.last else {
            throw .invalidArgument("GET names an empty page list: name at least one page, or send no list for the cached prefix")
        }
        guard (last + 1) * size <= tokens.count else {
            throw .invalidArgument("GET asks for page \(last), but \(tokens.count) tokens hold \(tokens.count / size) whole pages of \(size): send the tokens up to the end of the last page wanted")
        }
        let memory: any PageMemory
        if let existing { memory = existing } else { memory = try self.memory(for: tenant) }
        let keys = Self.wholePageKeys(model, tokens, limit: last + 1)
        var wanted = indices.map { index in
            PageRef(address: PageAddress(tenant: tenant, key: keys[index]), tokens: index * size..<(index + 1) * size, tier: .ram)
        }
        @Sendable func counted(_ result: GetResult) -> GetResult {
            var result = result
            result.tokens = result.pages.count * size
            return result
        }
        if let result = try leaseIfResident(tenant, owner: owner, wanted, maxTokens: 0) { return .done(counted(result)) }
        // The leading pages stored in either tier: the rest of the list is not served.
        let inRAM = state.withLock { s in wanted.map { s.resident[$0.address] != nil } }
        let onDisk = disk?.containsEach(wanted.map(\.address), skipping: inRAM) ?? inRAM.map { _ in false }
        let stored = wanted.indices.prefix { inRAM[$0] || onDisk[$0] }
        wanted = stored.map { index in
            var page = wanted[index]
            page.tier = inRAM[index] ? .ram : .disk
            return page
        }
        let located = wanted
        return .pending { [self] () async throws(StoreError) -> GetResult in
            counted(try await finishGet(tenant, owner: owner, model, memory, located, remoteCandidates: [], maxTokens: 0))
        }
    }

    /// Leases `pages` when all are in RAM and the leases keep the tenant within its quota, in one
    /// lock of the store; nil (nothing changed) otherwise. Throws when the connection or tenant
    /// may hold no more leases.
    private func leaseIfResident(_ tenant: TenantID, owner: UInt64, _ pages: [PageRef], maxTokens: Int) throws(StoreError) -> GetResult? {
        let now = Clocks.monotonicMicros()
        let outcome = state.withLock { s -> Result<GetResult?, StoreError> in
            if let refusal = s.leases.refusal(tenant: tenant, owner: owner, configuration) { return .failure(.overBudget(refusal)) }
            var served: [ServedPage] = []
            served.reserveCapacity(pages.count)
            var leasedBytes = s.tenantLeased[tenant] ?? 0
            for page in pages {
                // Not in RAM (any more): the pending work loads it, or ends the prefix there.
                guard let resident = s.resident[page.address] else { return .success(nil) }
                served.append(ServedPage(extent: resident.extent, tokens: resident.tokens))
                if resident.leases == 0 { leasedBytes += resident.extent.length }
            }
            // Over the tenant's quota: the pending work serves what fits.
            guard leasedBytes <= configuration.tenantRAMQuotaBytes else { return .success(nil) }
            for page in pages { _ = s.lease(page.address, now: now) }
            let id = s.leases.add(Lease(tenant: tenant, owner: owner, pages: pages.map(\.address), staging: []))
            s.counters.gets += 1
            let servedTokens = pages.last.map { maxTokens > 0 ? min($0.tokens.upperBound, maxTokens) : $0.tokens.upperBound } ?? 0
            return .success(GetResult(tokens: servedTokens, leaseID: id, pages: served))
        }
        return try outcome.get()
    }

    /// The rest of a GET whose prefix is not all in RAM: disk pages come in one batched read (or
    /// with a load already under way, e.g. prefetch), within the tenant's quota.
    private func finishGet(_ tenant: TenantID, owner: UInt64, _ model: ModelSpec, _ memory: any PageMemory, _ located: [PageRef],
                           remoteCandidates: [PageAddress], maxTokens: Int) async throws(StoreError) -> GetResult {
        if let refusal = state.withLock({ $0.leases.refusal(tenant: tenant, owner: owner, configuration) }) { throw .overBudget(refusal) }
        // Pages loaded or promoted are held until pinned, so the evictor cannot take a page this
        // GET just read (without blocking eviction, or other GETs, during the read).
        var held = Set<PageAddress>()
        defer { state.withLock { s in for address in held { s.endHold(address) } } }
        var located = located
        if !remoteCandidates.isEmpty {
            // As many remote pages as the tenant's quota could lease: one batched fetch each
            // `remoteBatchBytes`, promoted into RAM.
            let size = model.pageTokens
            let wanted = located + remoteCandidates.enumerated().map { offset, address in
                PageRef(address: address, tokens: (located.count + offset) * size..<(located.count + offset + 1) * size, tier: .remote)
            }
            let limit = fittingQuota(tenant, model, wanted).count - located.count
            located += await promoteFromRemote(tenant, model, memory, remoteCandidates, firstIndex: located.count, limit: limit, held: &held)
        }
        // Leased pages count against the tenant's RAM quota: serve what fits rather than push
        // other tenants' pages out.
        let fitting = fittingQuota(tenant, model, located)
        if fitting.isEmpty, !located.isEmpty {
            throw .overBudget("this tenant's leases hold \(ByteCount(state.withLock { $0.tenantLeased[tenant] ?? 0 })) of RAM, its quota (tenantRAMQuota \(ByteCount(configuration.tenantRAMQuotaBytes))) leaves no room for another page: RELEASE leases, or raise tenantRAMQuota")
        }
        // Room for the disk pages among the tenant's own pages first, so its arena has space.
        let loading = fitting.filter { $0.tier == .disk }.map(\.address)
        if !loading.isEmpty {
            await makeRoom(reserving: (tenant, loading.count * Self.extentBytes(model.pageTokens * model.bytesPerToken)))
        }
        await load(loading, model, memory, prefetch: false, holding: true, held: &held)
        var served: [ServedPage] = []
        var addresses: [PageAddress] = []
        var servedTokens = 0
        for page in fitting {
            guard let extent = await pin(page.address, model, memory) else { break }
            served.append(ServedPage(extent: extent.extent, tokens: extent.tokens))
            addresses.append(page.address)
            servedTokens = maxTokens > 0 ? min(page.tokens.upperBound, maxTokens) : page.tokens.upperBound
        }
        let id = state.withLock { s -> UInt64? in
            // Checked again: the connection's other requests may have taken leases meanwhile.
            guard s.leases.refusal(tenant: tenant, owner: owner, configuration) == nil else {
                for address in addresses { s.endLease(address) }
                return nil
            }
            s.counters.gets += 1
            return s.leases.add(Lease(tenant: tenant, owner: owner, pages: addresses, staging: []))
        }
        scheduleEviction()
        guard let id else { throw .overBudget(state.withLock { $0.leases.refusal(tenant: tenant, owner: owner, configuration) } ?? "too many leases: RELEASE some") }
        return GetResult(tokens: servedTokens, leaseID: id, pages: served)
    }

    /// Bytes of RAM a page of `bytes` takes: its extent, rounded up to the allocator's granule.
    static func extentBytes(_ bytes: Int) -> Int {
        let granule = ExtentAllocator.granuleBytes
        return (bytes + granule - 1) / granule * granule
    }

    /// The leading pages of `pages` whose leases keep the tenant's leased bytes within its RAM
    /// quota (a page leased already counts once).
    func fittingQuota(_ tenant: TenantID, _ model: ModelSpec, _ pages: [PageRef]) -> [PageRef] {
        let quota = configuration.tenantRAMQuotaBytes
        let pageBytes = Self.extentBytes(model.pageTokens * model.bytesPerToken)
        return state.withLock { s in
            var held = s.tenantLeased[tenant] ?? 0
            var fitting: [PageRef] = []
            for page in pages {
                let bytes = s.resident[page.address].map { $0.leases > 0 ? 0 : $0.extent.length } ?? pageBytes
                guard held + bytes <= quota else { break }
                held += bytes
                fitting.append(page)
            }
            return fitting
        }
    }

    /// Takes a lease on a page in RAM, loading it again if it was evicted since the GET's
    /// `load` brought it in. Nil when it is not to be had (gone from disk, memory full, damage).
    private func pin(_ address: PageAddress, _ model: ModelSpec, _ memory: any PageMemory) async -> (extent: Extent, tokens: Int)? {
        func leased() -> (extent: Extent, tokens: Int)? {
            state.withLock { $0.lease(address, now: Clocks.monotonicMicros()) }.map { ($0.extent, $0.tokens) }
        }
        if let hit = leased() { return hit }
        await load([address], model, memory, prefetch: false)
        return leased()
    }
}
