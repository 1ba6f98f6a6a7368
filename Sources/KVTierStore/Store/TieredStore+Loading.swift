import KVTierCore
import Synchronization

extension TieredStore {
    /// A load in flight: the callers waiting for its pages.
    struct Loading {
        var waiters: [CheckedContinuation<Void, Never>] = []
    }

    /// Brings disk pages into the tenant's memory, unleased: one batched disk read (reads in
    /// flight together, pages decoded on every core as they arrive), sharing loads already under
    /// way, so a GET that comes while prefetch is loading its pages waits for them instead of
    /// reading them again. Returns when every page is resident or failed to load (a miss, out
    /// of memory, damage): callers check residency. Returns how many pages this call read in.
    @discardableResult
    func load(_ addresses: [PageAddress], _ model: ModelSpec, _ memory: any PageMemory, prefetch: Bool) async -> Int {
        guard let disk, !addresses.isEmpty else { return 0 }
        var mine: [PageAddress] = []
        var theirs: [PageAddress] = []
        state.withLock { s in
            for address in addresses where s.resident[address] == nil {
                if s.loading[address] != nil {
                    theirs.append(address)
                } else {
                    s.loading[address] = Loading()
                    mine.append(address)
                }
            }
        }
        let loaded = mine.isEmpty ? 0 : await read(mine, disk, model, memory, prefetch: prefetch)
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
        return loaded
    }

    /// Reads `addresses` (registered as loading by the caller) into fresh extents and makes them
    /// resident; then ends their loads and wakes whoever waited. Returns the pages made resident.
    private func read(_ addresses: [PageAddress], _ disk: DiskTier, _ model: ModelSpec, _ memory: any PageMemory, prefetch: Bool) async -> Int {
        var targets: [(address: PageAddress, extent: Extent)] = []
        for address in addresses {
            guard let stored = disk.page(address), let extent = memory.allocate(stored.shape.rawBytes) else { continue }
            targets.append((address, extent))
        }
        let results = await disk.read(targets.map(\.address), into: targets.map { memory.buffer($0.extent) })
        let now = Clocks.monotonicMicros()
        var unused: [Extent] = []
        var loaded = 0
        let waiters = state.withLock { s -> [CheckedContinuation<Void, Never>] in
            for (target, result) in zip(targets, results) {
                guard case .success(let page) = result, s.resident[target.address] == nil else {
                    unused.append(target.extent)  // failed, or stored meanwhile by a put
                    continue
                }
                var resident = Resident(extent: target.extent, modelID: model.id, tokens: page.page.shape.tokens,
                                        lastAccessMicros: now, residentSinceMicros: now, onDisk: true, prefetched: prefetch)
                if let heat = s.evictedHeat.removeValue(forKey: target.address) { resident.attention = heat }
                s.insertResident(target.address, resident)
                loaded += 1
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
        return loaded
    }
}
