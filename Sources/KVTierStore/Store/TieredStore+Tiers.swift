#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import KVTierCodec
import KVTierCore
import Synchronization

extension TieredStore {
    // MARK: get

    /// Leases the pages of the longest cached prefix of `tokens` (up to `maxTokens`, 0 for all),
    /// promoting disk pages into the tenant's memory first. A page that fails to load ends the
    /// prefix there: the client gets fewer tokens, never wrong ones.
    public func get(_ tenant: TenantID, owner: UInt64, modelID: UInt64, tokens: [UInt32], maxTokens: Int) async throws(StoreError) -> GetResult {
        let model = try model(modelID)
        let memory = try memory(for: tenant)
        if let refusal = state.withLock({ $0.leases.refusal(tenant: tenant, owner: owner, configuration) }) { throw .overBudget(refusal) }
        var located = locate(tenant, model, tokens)
        if maxTokens > 0 {
            located = located.filter { $0.tokens.lowerBound < maxTokens }
        }
        // Leased pages count against the tenant's RAM quota: serve what fits rather than push
        // other tenants' pages out.
        let fitting = fittingQuota(tenant, model, located)
        if fitting.isEmpty, !located.isEmpty {
            throw .overBudget("this tenant's leases hold \(ByteCount(state.withLock { $0.tenantLeased[tenant] ?? 0 })) of RAM, its quota (tenantRAMQuota \(ByteCount(configuration.tenantRAMQuotaBytes))) leaves no room for another page: RELEASE leases, or raise tenantRAMQuota")
        }
        located = fitting
        // Room for the disk pages among the tenant's own pages first, so its arena has space.
        let loading = located.filter { $0.tier == .disk }.count
        if loading > 0 {
            let granule = ExtentAllocator.granuleBytes
            await makeRoom(reserving: (tenant, loading * ((model.pageTokens * model.bytesPerToken + granule - 1) / granule * granule)))
        }
        // Disk pages come in one batched read (or with a load already under way, e.g. prefetch).
        await load(located.filter { $0.tier == .disk }.map(\.address), model, memory, prefetch: false)
        var served: [ServedPage] = []
        var addresses: [PageAddress] = []
        var servedTokens = 0
        for page in located {
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
        guard let id else { throw .overBudget(state.withLock { $0.leases.refusal(tenant: tenant, owner: owner, configuration) } ?? "too many leases: RELEASE some") }
        await makeRoom()
        return GetResult(tokens: servedTokens, leaseID: id, pages: served)
    }

    /// The leading pages of `pages` whose leases keep the tenant's leased bytes within its RAM
    /// quota (a page leased already counts once).
    func fittingQuota(_ tenant: TenantID, _ model: ModelSpec, _ pages: [PageRef]) -> [PageRef] {
        let quota = configuration.tenantRAMQuotaBytes
        let granule = ExtentAllocator.granuleBytes
        let pageBytes = (model.pageTokens * model.bytesPerToken + granule - 1) / granule * granule
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

    /// A page's bytes wherever it is: its RAM extent (leased until `unlease`, so eviction cannot
    /// free it while the caller reads), or a decoded copy from disk (`leased` false).
    func residentBuffer(_ address: PageAddress, _ model: ModelSpec, _ memory: any PageMemory) async -> (buffer: PageBuffer, tokens: Int, leased: Bool)? {
        if let page = state.withLock({ s -> Resident? in
            s.addLease(address)
            return s.resident[address]
        }) { return (memory.buffer(page.extent), page.tokens, true) }
        guard let disk, case .success(let page) = await disk.read(address) else { return nil }
        return (page.data, page.page.shape.tokens, false)
    }

    /// Ends a lease taken by `residentBuffer` or `persist`.
    func unlease(_ address: PageAddress) {
        state.withLock { $0.endLease(address) }
    }

    // MARK: disk

    /// Writes a RAM page to disk (if it is not there yet) and waits until it is durable. The page
    /// is leased meanwhile: a concurrent eviction must not free (and another page reuse) the
    /// memory the record is being encoded from.
    func persist(_ address: PageAddress) async throws(StoreError) {
        guard let disk else { throw .unavailable("no disk tier is configured: durable puts need one") }
        // `onDisk` alone may be stale: the disk budget deletes pages that are also in RAM.
        let stored = disk.contains(address)
        guard let page = state.withLock({ s -> Resident? in
            guard let page = s.resident[address], !(page.onDisk && stored), s.models[page.modelID] != nil, s.memories[address.tenant] != nil else { return nil }
            s.addLease(address)
            return page
        }) else { return }
        defer { unlease(address) }
        guard let model = state.withLock({ $0.models[page.modelID] }),
              let memory = state.withLock({ $0.memories[address.tenant] }) else { return }
        let shape = model.pageShape(tokens: page.tokens)
        // The model's own codec when it chose one at registration, else the daemon's.
        var codec = model.diskCodec ?? configuration.diskCodec
        if (try? codec.quantizer.check(shape.section)) == nil { codec = Codec(.fp16, codec.lossless) }
        do {
            try await disk.write(address, modelID: page.modelID, codec: codec, shape: shape, data: memory.buffer(page.extent))
        } catch let error {
            if case .overBudget(let why) = error {
                throw .overBudget(why)
            } else if case .codec(.nonFiniteInput) = error {
                // Quantizers refuse NaN/Inf; such pages keep every bit as fp16.
                do {
                    try await disk.write(address, modelID: page.modelID, codec: Codec(.fp16, codec.lossless), shape: shape, data: memory.buffer(page.extent))
                } catch {
                    state.withLock { $0.counters.diskWriteFailures += 1 }
                    throw .unavailable("\(error)")
                }
            } else {
                state.withLock { $0.counters.diskWriteFailures += 1 }
                throw .unavailable("\(error)")
            }
        }
        state.withLock { $0.resident[address]?.onDisk = true }
    }

    /// Whether evicting a RAM page would lose it: it was never written, or the disk budget has
    /// deleted its disk copy since.
    func needsWrite(_ page: Resident, _ address: PageAddress) -> Bool {
        !page.onDisk || disk?.contains(address) != true
    }

    /// Removes a page from both tiers (a superseded partial page).
    /// Does nothing while a session holds the page (the catalog refuses new holds while the drop
    /// runs) or a client leases it (both copies stay; it is a duplicate, never wrong).
    func drop(_ address: PageAddress) async {
        guard catalog.beginDrop(address) else { return }
        defer { catalog.endDrop(address) }
        let (freed, leased) = state.withLock { s -> (Extent?, Bool) in
            guard let page = s.resident[address] else { return (nil, false) }
            guard page.leases == 0 else { return (nil, true) }
            _ = s.removeResident(address)
            return (page.extent, false)
        }
        if leased { return }
        if let freed, let memory = state.withLock({ $0.memories[address.tenant] }) { memory.free(freed) }
        _ = try? await disk?.delete(address)
    }

    // MARK: eviction

    /// A page's heat: uses plus reported attention, halving every `heatHalfLifeMicros` since
    /// its last access.
    func heat(_ page: Resident, now: UInt64) -> Double {
        let age = Double(now &- min(now, page.lastAccessMicros)) / Double(configuration.heatHalfLifeMicros)
        return (page.uses + page.attention) * exp2(-age)
    }

    /// Moves the coldest unleased pages to disk until RAM is within budget (`evictionPolicy`).
    /// By heat, pages younger than the minimum residence go last, so a page just promoted is
    /// not evicted at once; by LRU, the least recently accessed page goes first.
    ///
    /// `reserving` makes room in advance for bytes a tenant is about to load: its own pages go
    /// first, so its page arena (sized to its quota) has the space.
    public func makeRoom(reserving: (tenant: TenantID, bytes: Int)? = nil) async {
        while true {
            let victims = chooseVictims(reserving: reserving)
            guard !victims.isEmpty else { return }
            var evicted = 0
            for (address, page) in victims {
                if needsWrite(page, address) {
                    do { try await persist(address) } catch {
                        // A tenant without disk room keeps this page in RAM; others' pages may
                        // still move, so one full quota does not stop eviction for everyone.
                        if case .overBudget = error { continue }
                        logger.warning("cannot evict a page to disk; RAM stays over budget", metadata: ["page": "\(address)", "error": "\(error)"])
                        return
                    }
                }
                if evictFromRAM(address) { evicted += 1 }
            }
            // Every chosen page was leased meanwhile: nothing more can go now.
            if evicted == 0 { return }
        }
    }

    /// Removes an unleased page from RAM (callers write it to disk first when it needs it),
    /// remembering its heat for prefetch. False when it is leased or gone.
    func evictFromRAM(_ address: PageAddress) -> Bool {
        let freed = state.withLock { s -> (Extent, any PageMemory)? in
            guard let page = s.resident[address], page.leases == 0, let memory = s.memories[address.tenant] else { return nil }
            _ = s.removeResident(address)
            s.counters.evictions += 1
            if s.evictedHeat.count >= Self.evictedHeatLimit { s.evictedHeat.removeAll(keepingCapacity: true) }
            s.evictedHeat[address] = heat(page, now: Clocks.monotonicMicros())
            return (page.extent, memory)
        }
        guard let (extent, memory) = freed else { return false }
        memory.free(extent)
        return true
    }

    /// Pages whose heat at eviction prefetch remembers (forgotten all at once beyond it).
    static let evictedHeatLimit = 1 << 20

    /// The pages to evict, coldest first, chosen in one pass over the resident pages (not one
    /// pass per page): a tenant over its RAM quota gives up its own pages until it is within it;
    /// then, while RAM is over the global budget, only tenants above their fair share (the
    /// budget over the tenants with pages in RAM) give up pages, so one tenant's pressure never
    /// pushes out a tenant that keeps to its share. Heat prefers pages past their minimum
    /// residence; LRU orders by last access alone. Pinned sessions' pages and leased pages stay.
    private func chooseVictims(reserving: (tenant: TenantID, bytes: Int)?) -> [(PageAddress, Resident)] {
        // Asking the catalog about every resident page is only needed while something is pinned.
        let anyPinned = catalog.pinnedBytes > 0
        return state.withLock { s in
            let quota = configuration.tenantRAMQuotaBytes
            var tenantExcess = s.tenantRAM.compactMapValues { $0 > quota ? $0 - quota : nil }
            if let reserving {
                let wanted = (s.tenantRAM[reserving.tenant] ?? 0) + reserving.bytes - quota
                if wanted > 0 { tenantExcess[reserving.tenant] = wanted }
            }
            var excess = s.ramBytes - configuration.ramBudgetBytes
            guard excess > 0 || !tenantExcess.isEmpty else { return [] }
            let fairShare = configuration.ramBudgetBytes / max(1, s.tenantRAM.count)
            var aboveFair = s.tenantRAM.compactMapValues { $0 > fairShare ? $0 - fairShare : nil }
            let now = Clocks.monotonicMicros()
            var candidates: [(address: PageAddress, page: Resident, young: Bool, score: Double)] = []
            for (address, page) in s.resident where page.leases == 0 && (aboveFair[address.tenant] != nil || tenantExcess[address.tenant] != nil)
                && !(anyPinned && catalog.hold(on: address) == .pinned) {
                switch configuration.evictionPolicy {
                case .lru:
                    candidates.append((address, page, false, Double(page.lastAccessMicros)))
                case .heat:
                    let young = now &- page.residentSinceMicros < configuration.minResidenceMicros
                    candidates.append((address, page, young, heat(page, now: now)))
                }
            }
            candidates.sort { ($0.young ? 1 : 0, $0.score) < ($1.young ? 1 : 0, $1.score) }
            var chosen: [(PageAddress, Resident)] = []
            for candidate in candidates {
                let tenant = candidate.address.tenant, bytes = candidate.page.extent.length
                let overQuota = (tenantExcess[tenant] ?? 0) > 0
                let overShare = excess > 0 && (aboveFair[tenant] ?? 0) > 0
                guard overQuota || overShare else { continue }
                chosen.append((candidate.address, candidate.page))
                tenantExcess[tenant] = (tenantExcess[tenant] ?? 0) - bytes
                aboveFair[tenant] = (aboveFair[tenant] ?? 0) - bytes
                excess -= bytes
                if excess <= 0, !tenantExcess.values.contains(where: { $0 > 0 }) { break }
            }
            return chosen
        }
    }

    // MARK: attention and status

    /// Adds the attention mass a client measured per page of `tokens` to those pages' heat.
    public func reportAttention(_ tenant: TenantID, modelID: UInt64, tokens: [UInt32], masses: [Float]) throws(StoreError) {
        let model = try model(modelID)
        let pages = locate(tenant, model, tokens)
        state.withLock { s in
            for (page, mass) in zip(pages, masses) where mass.isFinite && mass > 0 {
                if s.resident[page.address] != nil {
                    s.resident[page.address]!.attention += Double(mass)
                } else if s.evictedHeat.count < Self.evictedHeatLimit {
                    s.evictedHeat[page.address, default: 0] += Double(mass)  // steers prefetch order
                }
            }
        }
    }

    /// Counters and gauges, named as in `kvtier status`. Never waits for the store's lock:
    /// when a request holds it, the figures are those of the last call that got it (and
    /// `status_stale` is 1), so the watchdog and STATUS answer whatever requests do.
    public func status() -> [(name: String, value: UInt64)] {
        // Read before taking the store's lock: the catalog's lock may be held across a journal sync.
        let sessions = catalog.count, pinnedBytes = catalog.pinnedBytes
        var gauges: [(name: String, value: UInt64)]? = nil
        for attempt in 0..<Self.statusLockAttempts {
            if attempt > 0 { usleep(Self.statusLockRetryMicros) }
            gauges = state.withLockIfAvailable { s in storeGauges(s, sessions: sessions, pinnedBytes: pinnedBytes) }
            if let gauges {
                statusSnapshot.withLock { $0 = gauges }
                break
            }
        }
        let stale: UInt64 = gauges == nil ? 1 : 0
        let figures = gauges ?? statusSnapshot.withLock { $0 }
        return figures + [("status_stale", stale)] + (disk.map { d -> [(String, UInt64)] in
            let stats = d.stats
            return [("disk_pages", UInt64(stats.pages)), ("disk_live_bytes", UInt64(stats.liveBytes)),
                    ("disk_file_bytes", UInt64(stats.fileBytes)), ("disk_checksum_failures", UInt64(stats.checksumFailures))]
        } ?? [])
    }

    /// How often, and how far apart, `status` tries the store's lock before answering from its
    /// last snapshot (about 10 ms in all).
    static let statusLockAttempts = 10
    static let statusLockRetryMicros: UInt32 = 1_000

    private func storeGauges(_ s: borrowing State, sessions: Int, pinnedBytes: Int) -> [(name: String, value: UInt64)] {
            let c = s.counters
            return [
                ("ram_pages", UInt64(s.resident.count)), ("ram_bytes", UInt64(s.ramBytes)),
                ("ram_budget_bytes", UInt64(configuration.ramBudgetBytes)),
                ("tenant_ram_quota_bytes", UInt64(configuration.tenantRAMQuotaBytes)), ("leases", UInt64(s.leases.count)),
                ("models", UInt64(s.models.count)), ("tenants", UInt64(s.memories.count)),
                ("lookups", UInt64(c.lookups)), ("lookup_hits_ram", UInt64(c.hitsRAM)), ("lookup_hits_disk", UInt64(c.hitsDisk)),
                ("lookup_misses", UInt64(c.misses)), ("puts", UInt64(c.puts)), ("pages_stored", UInt64(c.pagesStored)),
                ("pages_deduplicated", UInt64(c.pagesDeduplicated)), ("gets", UInt64(c.gets)),
                ("promotions", UInt64(c.promotions)), ("evictions", UInt64(c.evictions)),
                ("disk_write_failures", UInt64(c.diskWriteFailures)),
                ("prefetch_issued", UInt64(c.prefetchIssued)), ("prefetch_loaded", UInt64(c.prefetchLoaded)),
                ("prefetch_useful", UInt64(c.prefetchUseful)), ("sessions", UInt64(sessions)),
                ("sessions_expired", UInt64(c.sessionsExpired)), ("pinned_bytes", UInt64(pinnedBytes)),
            ]
    }
}
