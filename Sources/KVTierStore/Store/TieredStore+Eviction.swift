#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import KVTierCodec
import KVTierCore
import Synchronization

extension TieredStore {
    /// A page's bytes wherever it is: its RAM extent (held until `endHold`, so eviction cannot
    /// free it while the caller reads), or a decoded copy from disk (`held` false).
    func residentBuffer(_ address: PageAddress, _ model: ModelSpec, _ memory: any PageMemory) async -> (buffer: PageBuffer, tokens: Int, held: Bool)? {
        if let page = state.withLock({ s -> Resident? in
            guard s.hold(address) else { return nil }
            return s.resident[address]
        }) { return (memory.buffer(page.extent), page.tokens, true) }
        guard let disk, case .success(let page) = await disk.read(address) else { return nil }
        return (page.data, page.page.shape.tokens, false)
    }

    /// Ends a hold taken by `residentBuffer`.
    func endHold(_ address: PageAddress) {
        state.withLock { $0.endHold(address) }
    }

    // MARK: disk

    /// Writes a RAM page to disk (if it is not there yet) and waits until it is durable.
    func persist(_ address: PageAddress) async throws(StoreError) {
        try await persist([address])[0].get()
    }

    /// Writes the RAM pages among `addresses` that are not on disk yet as one group commit
    /// (`DiskTier.write(_:)`: encoded on every core, one fdatasync) and waits until they are
    /// durable. Each page is leased meanwhile: a concurrent eviction must not free (and another
    /// page reuse) the memory its record is being encoded from. Results in `addresses` order;
    /// a page not in RAM (or already on disk) succeeds without a write. `durable`: the pages of a
    /// durable or session put, which `remotePages` "durable" copies to the remote tier.
    func persist(_ addresses: [PageAddress], durable: Bool = false) async -> [Result<Void, StoreError>] {
        // In windows: a window's pages are encoded and held in memory together until their group
        // commit, so a session of thousands of pages costs a window's memory, not its own size.
        guard addresses.count <= Self.evictionGroupPages else {
            var results: [Result<Void, StoreError>] = []
            for start in stride(from: 0, to: addresses.count, by: Self.evictionGroupPages) {
                results += await persist(Array(addresses[start..<min(start + Self.evictionGroupPages, addresses.count)]), durable: durable)
            }
            return results
        }
        guard let disk else {
            return Array(repeating: .failure(.unavailable("no disk tier is configured: durable puts need one")), count: addresses.count)
        }
        // `onDisk` alone may be stale: the disk budget deletes pages that are also in RAM.
        let stored = disk.containsEach(addresses, skipping: Array(repeating: false, count: addresses.count))
        let pending = state.withLock { s -> [(index: Int, write: DiskTier.PageWrite)] in
            var pending: [(Int, DiskTier.PageWrite)] = []
            for (index, address) in addresses.enumerated() {
                guard let page = s.resident[address], !(page.onDisk && stored[index]), let model = s.models[page.modelID],
                      let memory = s.memories[address.tenant] else { continue }
                // Held, not leased: the write is the store's, and no client's quota counts it.
                _ = s.hold(address)
                let shape = model.pageShape(tokens: page.tokens)
                // The model's own codec when it chose one at registration, else the policy's.
                var codec = codecPolicy.codec(for: model, tenant: address.tenant)
                if (try? codec.quantizer.check(shape.section)) == nil { codec = Codec(.fp16, codec.lossless) }
                pending.append((index, DiskTier.PageWrite(address: address, modelID: page.modelID, codec: codec, shape: shape,
                                                          data: memory.buffer(page.extent),
                                                          copyRecord: copiesToRemote(page, model, durable: durable))))
            }
            return pending
        }
        var results = [Result<Void, StoreError>](repeating: .success(()), count: addresses.count)
        guard !pending.isEmpty else { return results }
        var written = await disk.write(pending.map(\.write))
        // Quantizers refuse NaN/Inf; such pages keep every bit as fp16.
        let nonFinite = written.indices.filter { if case .failure(.codec(.nonFiniteInput)) = written[$0] { true } else { false } }
        if !nonFinite.isEmpty {
            let retried = await disk.write(nonFinite.map { i in
                var write = pending[i].write
                write.codec = Codec(.fp16, write.codec.lossless)
                return write
            })
            for (i, result) in zip(nonFinite, retried) { written[i] = result }
        }
        state.withLock { s in
            for ((index, write), result) in zip(pending, written) {
                switch result {
                case .success:
                    s.resident[write.address]?.onDisk = true
                case .failure(.overBudget(let why)):
                    results[index] = .failure(.overBudget(why))
                case .failure(let error):
                    s.counters.diskWriteFailures += 1
                    results[index] = .failure(.unavailable("\(error)"))
                }
                s.endHold(write.address)
            }
        }
        return results
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
            guard page.leases == 0, page.holds == 0 else { return (nil, true) }
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

    /// RAM the background evictor keeps free (`Configuration.evictionHeadroomBytes`) below a
    /// limit of `limit` bytes.
    func headroom(below limit: Int) -> Int {
        if let configured = configuration.evictionHeadroomBytes { return min(max(0, configured), limit / 2) }
        return min(limit / 2, max(limit / 8, Self.minimumHeadroomBytes))
    }

    static let minimumHeadroomBytes = 64 << 20

    /// Starts the background evictor when RAM (or a tenant's share of it) has less than half its
    /// headroom free; it writes the coldest pages to disk in groups and frees them until the whole
    /// headroom is free, off every request's path. Returns at once.
    func scheduleEviction() {
        let start = state.withLock { s -> Bool in
            guard !s.evicting, evictionTargets(s, reserving: nil, headroomFraction: 2) != nil else { return false }
            s.evicting = true
            return true
        }
        guard start else { return }
        // Registered before the task can end, so `evictionSettled` never misses it.
        evictor.withLock { slot in
            slot = Task.detached(priority: .utility) { [self] in
                await evictUntilHeadroom()
            }
        }
    }

    /// Waits until the background evictor (if it runs) has stopped.
    public func evictionSettled() async {
        while let task = evictor.withLock({ $0 }) {
            await task.value
            // A later run may have replaced it meanwhile: wait for that one too.
            let replaced = evictor.withLock { slot -> Bool in
                if slot == task { slot = nil; return false }
                return slot != nil
            }
            if !replaced { return }
        }
    }

    private func evictUntilHeadroom() async {
        while true {
            let evicted = await makeRoom(reserving: nil, background: true)
            let again = state.withLock { s -> Bool in
                // Nothing could go (all leased, no disk room): the next request tries again.
                guard evicted > 0, evictionTargets(s, reserving: nil, headroomFraction: 1) != nil else {
                    s.evicting = false
                    // Stopped short of its headroom (everything left leased or held): a RELEASE
                    // that frees pages starts it again.
                    s.evictionStalled = evicted == 0 && evictionTargets(s, reserving: nil, headroomFraction: 1) != nil
                    return false
                }
                return true
            }
            if !again { return }
        }
    }

    /// Moves the coldest unleased pages to disk until RAM is within budget (`evictionPolicy`),
    /// in groups of at most `evictionGroupPages` written with one group commit. By heat, pages
    /// younger than the minimum residence go last, so a page just promoted is not evicted at
    /// once; by LRU, the least recently accessed page goes first.
    ///
    /// `reserving` makes room in advance for bytes a tenant is about to load or put: its own pages
    /// go first, so its page arena (sized to its quota) has the space. `background` evicts down
    /// to the headroom below the budget and quotas instead. Returns the pages evicted.
    @discardableResult
    public func makeRoom(reserving: (tenant: TenantID, bytes: Int)? = nil, background: Bool = false) async -> Int {
        var total = 0
        // Pages the disk tier refused (their tenant's disk quota is full): skipped from then on,
        // so one tenant's full quota does not stop eviction of everyone else's pages.
        var refused = Set<PageAddress>()
        while true {
            await evictionGate.enter()
            let step = await evictGroup(reserving: reserving, background: background, excluding: refused)
            evictionGate.leave()
            guard let step else { return total }
            total += step.evicted
            refused.formUnion(step.refused)
            // Nothing went and nothing was refused: every chosen page was leased meanwhile.
            if step.evicted == 0 && step.refused.isEmpty { return total }
        }
    }

    /// One step of `makeRoom`: the coldest pages (not in `excluding`), at most
    /// `evictionGroupPages`, written to disk where needed (one group commit) and freed. Nil when
    /// nothing needs to go, or a write failed for a reason other than a full disk quota
    /// (logged); else the pages freed and those the disk tier refused.
    private func evictGroup(reserving: (tenant: TenantID, bytes: Int)?, background: Bool, excluding: Set<PageAddress>) async
        -> (evicted: Int, refused: Set<PageAddress>)? {
        let group = chooseVictims(reserving: reserving, headroomFraction: background ? 1 : 0, limit: Self.evictionGroupPages,
                                  excluding: excluding)
        guard !group.isEmpty else { return nil }
        // `persist` writes only the pages that need it (one disk lookup for the group).
        let writing = group.map(\.0)
        let results = await persist(writing)
        var failed = Set<PageAddress>()
        for (address, result) in zip(writing, results) {
            guard case .failure(let error) = result else { continue }
            failed.insert(address)
            // A tenant without disk room keeps this page in RAM; others' pages may still move,
            // so one full quota does not stop eviction for everyone.
            if case .overBudget = error { continue }
            logger.warning("cannot evict a page to disk; RAM stays over budget", metadata: ["page": "\(address)", "error": "\(error)"])
            return nil
        }
        var evicted = 0
        for (address, _) in group where !failed.contains(address) {
            if evictFromRAM(address) { evicted += 1 }
        }
        return (evicted, failed)
    }

    /// Pages evicted per group commit.
    static let evictionGroupPages = 64

    /// Removes an unleased page from RAM (callers write it to disk first), remembering its heat
    /// for prefetch. False when it is leased, held, gone, or has no disk copy: the disk budget
    /// may delete a page's disk copy while its RAM copy waits to be evicted, and the RAM copy is
    /// then the last one. Checked under the store's lock (the disk tier never takes the store's
    /// lock, so taking its lock inside is safe): after this the page is an ordinary disk page.
    /// `requiringDiskCopy` false: the caller deletes the page from both tiers (`kvtier evict
    /// --delete`).
    func evictFromRAM(_ address: PageAddress, requiringDiskCopy: Bool = true) -> Bool {
        let freed = state.withLock { s -> (Extent, any PageMemory)? in
            guard let page = s.resident[address], page.leases == 0, page.holds == 0, let memory = s.memories[address.tenant],
                  !requiringDiskCopy || disk?.contains(address) == true else { return nil }
            _ = s.removeResident(address)
            s.counters.evictions += 1
            if page.prefetched { s.counters.prefetchWasted += 1 }
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

    /// What eviction has to free: bytes over the global budget and over each tenant's quota, less
    /// `headroom / headroomFraction` below each (0: none), plus what `reserving` is about to
    /// take. Nil when nothing needs to go.
    func evictionTargets(_ s: borrowing State, reserving: (tenant: TenantID, bytes: Int)?, headroomFraction: Int)
        -> (excess: Int, tenantExcess: [TenantID: Int])? {
        let budget = configuration.ramBudgetBytes, quota = configuration.tenantRAMQuotaBytes
        let budgetSlack = headroomFraction > 0 ? headroom(below: budget) / headroomFraction : 0
        let quotaSlack = headroomFraction > 0 ? headroom(below: quota) / headroomFraction : 0
        var tenantExcess = s.tenantRAM.compactMapValues { $0 + quotaSlack > quota ? $0 + quotaSlack - quota : nil }
        var excess = s.ramBytes + budgetSlack - budget
        if let reserving {
            let wanted = (s.tenantRAM[reserving.tenant] ?? 0) + reserving.bytes - quota
            if wanted > 0 { tenantExcess[reserving.tenant] = max(tenantExcess[reserving.tenant] ?? 0, wanted) }
            excess += reserving.bytes
        }
        guard excess > 0 || !tenantExcess.isEmpty else { return nil }
        return (excess, tenantExcess)
    }

    /// The pages to evict, coldest first: a tenant over its RAM quota gives up its own pages
    /// until it is within it; then, while RAM is over the global budget, only tenants above
    /// their fair share (the budget over the tenants with pages in RAM) give up pages, so one
    /// tenant's pressure never pushes out a tenant that keeps to its share. Heat prefers pages
    /// past their minimum residence; LRU orders by last access alone. Pinned sessions' pages and
    /// leased pages stay. The candidates are copied under the store's lock and sorted after it
    /// is released, so requests wait only for the copy.
    private func chooseVictims(reserving: (tenant: TenantID, bytes: Int)?, headroomFraction: Int, limit: Int,
                               excluding: Set<PageAddress> = []) -> [(PageAddress, Resident)] {
        // Asking the catalog about every resident page is only needed while something is pinned.
        let anyPinned = catalog.pinnedBytes > 0
        let now = Clocks.monotonicMicros()
        let snapshot = state.withLock { s -> (excess: Int, tenantExcess: [TenantID: Int], aboveFair: [TenantID: Int],
                                            candidates: [(address: PageAddress, page: Resident)])? in
            guard let (excess, tenantExcess) = evictionTargets(s, reserving: reserving, headroomFraction: headroomFraction) else { return nil }
            // The share of the RAM eviction aims at (the budget less the headroom it keeps free),
            // so tenants that fill RAM evenly are above it when headroom is wanted, while a tenant
            // that keeps well within its share is never pushed out by another's pressure.
            let target = configuration.ramBudgetBytes - (headroomFraction > 0 ? headroom(below: configuration.ramBudgetBytes) / headroomFraction : 0)
            let fairShare = target / max(1, s.tenantRAM.count)
            let aboveFair = s.tenantRAM.compactMapValues { $0 > fairShare ? $0 - fairShare : nil }
            var candidates: [(address: PageAddress, page: Resident)] = []
            for (address, page) in s.resident where page.leases == 0 && page.holds == 0
                && (aboveFair[address.tenant] != nil || tenantExcess[address.tenant] != nil) && !excluding.contains(address) {
                candidates.append((address, page))
            }
            return (excess, tenantExcess, aboveFair, candidates)
        }
        guard var (excess, tenantExcess, aboveFair, candidates) = snapshot else { return [] }
        if anyPinned { candidates.removeAll { catalog.hold(on: $0.address) == .pinned } }
        let scored = candidates.map { candidate -> (address: PageAddress, page: Resident, young: Bool, score: Double) in
            switch configuration.evictionPolicy {
            case .lru:
                return (candidate.address, candidate.page, false, Double(candidate.page.lastAccessMicros))
            case .heat:
                let young = now &- candidate.page.residentSinceMicros < configuration.minResidenceMicros
                return (candidate.address, candidate.page, young, heat(candidate.page, now: now))
            }
        }.sorted { ($0.young ? 1 : 0, $0.score) < ($1.young ? 1 : 0, $1.score) }
        var chosen: [(PageAddress, Resident)] = []
        for candidate in scored {
            let tenant = candidate.address.tenant, bytes = candidate.page.extent.length
            let overQuota = (tenantExcess[tenant] ?? 0) > 0
            let overShare = excess > 0 && (aboveFair[tenant] ?? 0) > 0
            guard overQuota || overShare else { continue }
            chosen.append((candidate.address, candidate.page))
            tenantExcess[tenant] = (tenantExcess[tenant] ?? 0) - bytes
            aboveFair[tenant] = (aboveFair[tenant] ?? 0) - bytes
            excess -= bytes
            if chosen.count >= limit || excess <= 0 && !tenantExcess.values.contains(where: { $0 > 0 }) { break }
        }
        return chosen
    }

    // MARK: attention and status

    /// Adds the attention mass a client measured per page of `tokens` to those pages' heat, and
    /// prefetches the disk pages among them reported with at least `attentionPrefetchMinMass`
    /// (most mass first, at most `attentionPrefetchPages`): a client reports the attention it
    /// expects at its next step, so the pages it will ask for are read while it computes.
    /// Returns the prefetch (its value: pages loaded), or nil when nothing was to be read.
    @discardableResult
    public func reportAttention(_ tenant: TenantID, modelID: UInt64, tokens: [UInt32], masses: [Float]) throws(StoreError) -> Task<Int, Never>? {
        let model = try model(modelID)
        let pages = locate(tenant, model, tokens)
        let limit = configuration.attentionPrefetchPages, least = configuration.attentionPrefetchMinMass
        let cold = state.withLock { s -> [(address: PageAddress, mass: Float)] in
            var cold: [(address: PageAddress, mass: Float)] = []
            for (page, mass) in zip(pages, masses) where mass.isFinite && mass > 0 {
                if s.resident[page.address] != nil {
                    s.resident[page.address]!.attention += Double(mass)
                    continue
                }
                if s.evictedHeat.count < Self.evictedHeatLimit {
                    s.evictedHeat[page.address, default: 0] += Double(mass)  // steers prefetch order
                }
                if limit > 0, page.tier == .disk, mass >= least, s.loading[page.address] == nil { cold.append((page.address, mass)) }
            }
            return cold
        }
        guard !cold.isEmpty else { return nil }
        // Most attended first; equal masses in sequence order (the sort is stable).
        let chosen = cold.sorted { $0.mass > $1.mass }.prefix(limit).map(\.address)
        return prefetch(tenant, model: model, addresses: Array(chosen))
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
        return figures + [("status_stale", stale)] + (remote?.tier.status() ?? []) + codecPolicy.status() + (disk.map { d -> [(String, UInt64)] in
            let stats = d.stats
            return [("disk_pages", UInt64(stats.pages)), ("disk_live_bytes", UInt64(stats.liveBytes)),
                    ("disk_file_bytes", UInt64(stats.fileBytes)), ("disk_checksum_failures", UInt64(stats.checksumFailures))]
                + (d.configuration.budgetBytes.map { [("disk_budget_bytes", UInt64($0))] } ?? [])
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
                ("prefetch_useful", UInt64(c.prefetchUseful)), ("prefetch_wasted", UInt64(c.prefetchWasted)),
                ("prefetch_late", UInt64(c.prefetchLate)),
                ("sessions", UInt64(sessions)),
                ("sessions_expired", UInt64(c.sessionsExpired)), ("pinned_bytes", UInt64(pinnedBytes)),
                ("puts_waited", UInt64(c.putsWaited)), ("evicting", s.evicting ? 1 : 0),
            ] + remoteCounters(c)
    }
}
