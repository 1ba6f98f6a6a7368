import KVTierCore
import Synchronization

extension TieredStore {
    /// A load in flight: the callers waiting for its pages.
    struct Loading {
        var waiters: [CheckedContinuation<Void, Never>] = []
        /// Prefetch started it: a GET that waits for it counts as late (`prefetchLate`).
        var prefetch = false
    }

    /// Brings disk pages into the tenant's memory, unleased: one batched disk read (reads in
    /// flight together, pages decoded on every core as they arrive), sharing loads already under
    /// way, so a GET that comes while prefetch is loading its pages waits for them instead of
    /// reading them again. Returns when every page is resident or failed to load (a miss, out
    /// of memory, damage): callers check residency. Returns how many pages this call read in.
    @discardableResult
    func load(_ addresses: [PageAddress], _ model: ModelSpec, _ memory: any PageMemory, prefetch: Bool) async -> Int {
        var held = Set<PageAddress>()
        return await load(addresses, model, memory, prefetch: prefetch, holding: false, held: &held)
    }

    /// `load`, and with `holding` a store hold (`Resident.holds`) on each page of `addresses`
    /// that is resident when the call returns, listed in `held`: eviction cannot take a page
    /// between its load and the caller's lease (the caller ends each hold with `endHold`).
    func load(_ addresses: [PageAddress], _ model: ModelSpec, _ memory: any PageMemory, prefetch: Bool, holding: Bool,
              held: inout Set<PageAddress>) async -> Int {
        guard let disk, !addresses.isEmpty else { return 0 }
        var mine: [PageAddress] = []
        var theirs: [PageAddress] = []
        state.withLock { s in
            for address in addresses where s.resident[address] == nil {
                if let other = s.loading[address] {
                    theirs.append(address)
                    if other.prefetch && !prefetch { s.counters.prefetchLate += 1 }
                } else {
                    s.loading[address] = Loading(prefetch: prefetch)
                    mine.append(address)
                }
            }
        }
        let inserted = mine.isEmpty ? [] : await read(mine, disk, model, memory, prefetch: prefetch, holding: holding)
        if holding { held.formUnion(inserted) }
        for address in theirs {
            await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
                let waiting = state.withLock { s -> Bool in
                    guard s.loading[address] != nil else { return false }
                    s.loading[address]!.waiters.append(done)
                    return true
                }
                if !waiting { done.resume() }
            }
        }
        if holding {
            // Pages another load brought in: held from now on, if they are still resident.
            let taken = state.withLock { s in theirs.filter { s.hold($0) } }
            held.formUnion(taken)
        }
        return inserted.count
    }

    /// Reads `addresses` (registered as loading by the caller) into fresh extents and makes them
    /// resident (with a store hold each when `holding`); then ends their loads and wakes whoever
    /// waited. Returns the pages it made resident.
    private func read(_ addresses: [PageAddress], _ disk: DiskTier, _ model: ModelSpec, _ memory: any PageMemory, prefetch: Bool,
                      holding: Bool = false) async -> [PageAddress] {
        var targets: [(address: PageAddress, extent: Extent)] = []
        for address in addresses {
            guard let stored = disk.page(address), let extent = memory.allocate(stored.shape.rawBytes) else { continue }
            targets.append((address, extent))
        }
        let results = await disk.read(targets.map(\.address), into: targets.map { memory.buffer($0.extent) })
        let now = Clocks.monotonicMicros()
        var unused: [Extent] = []
        var inserted: [PageAddress] = []
        let waiters = state.withLock { s -> [CheckedContinuation<Void, Never>] in
            for (target, result) in zip(targets, results) {
                guard case .success(let page) = result, s.resident[target.address] == nil else {
                    unused.append(target.extent)  // failed, or stored meanwhile by a put
                    continue
                }
                var resident = Resident(extent: target.extent, modelID: model.id, tokens: page.page.shape.tokens,
                                        lastAccessMicros: now, residentSinceMicros: now, onDisk: true, prefetched: prefetch)
                if let heat = s.evictedHeat.removeValue(forKey: target.address) { resident.attention = heat }
                if holding { resident.holds = 1 }
                s.insertResident(target.address, resident)
                inserted.append(target.address)
                if prefetch { s.counters.prefetchLoaded += 1 } else { s.counters.promotions += 1 }
            }
            var waiters: [CheckedContinuation<Void, Never>] = []
            for address in addresses {
                waiters += s.loading.removeValue(forKey: address)?.waiters ?? []
            }
            return waiters
        }
        for extent in unused { memory.free(extent) }
        for waiter in waiters { waiter.resume() }
        return inserted
    }
}
