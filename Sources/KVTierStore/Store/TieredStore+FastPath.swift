import KVTierCore
import Synchronization

/// Synchronous `get` and `put` for the common case, answered on the daemon's connection thread
/// without a trip through the cooperative pool: every page involved is in RAM, nothing needs
/// disk I/O, and RAM stays within budget. Each returns nil, having changed nothing, when the
/// request needs the async path (which then gives the same answer, errors included); when it
/// answers, the store is left exactly as the async path would have left it.
extension TieredStore {
    /// `get` when every page of the served prefix is already RAM-resident and RAM is within
    /// budget (so the async path would neither promote nor evict); nil otherwise.
    ///
    /// The store's lock is contended by every connection thread, so the common case (whole
    /// pages, all resident) takes it twice: once for the model and the tenant's memory, once to
    /// check and lease the pages, whose keys are hashed in between, outside it.
    public func getResident(_ tenant: TenantID, owner: UInt64, modelID: UInt64, tokens: [UInt32], maxTokens: Int) throws(StoreError) -> GetResult? {
        let (found, hasMemory) = state.withLock { s in (s.models[modelID], s.memories[tenant] != nil) }
        guard let model = found else { throw .unknownModel(modelID) }
        // A tenant's first request creates its memory, which may take a while: async path.
        guard hasMemory else { return nil }
        let size = model.pageTokens
        let wholePages = tokens.count / size
        let pageCount = maxTokens > 0 ? min(wholePages, (maxTokens + size - 1) / size) : wholePages
        // The served prefix may end in a stored partial page: that search is `locate`'s.
        let wantsPartial = wholePages * size < tokens.count && (maxTokens == 0 || wholePages * size < maxTokens)
        guard pageCount > 0, !wantsPartial else {
            return try getResidentLocating(tenant, owner: owner, model: model, tokens: tokens, maxTokens: maxTokens)
        }
        var addresses: [PageAddress] = []
        addresses.reserveCapacity(pageCount)
        var parent: PageKey? = nil
        for index in 0..<pageCount {
            let key = PageKeyChain.key(parent: parent, modelID: model.id, tokens: tokens[index * size..<(index + 1) * size])
            addresses.append(PageAddress(tenant: tenant, key: key))
            parent = key
        }
        let now = Clocks.monotonicMicros()
        let leased = state.withLock { s -> GetResult?? in
            guard s.ramBytes <= configuration.ramBudgetBytes,
                  s.leases.refusal(tenant: tenant, owner: owner, configuration) == nil else { return .some(nil) }
            var served: [ServedPage] = []
            served.reserveCapacity(pageCount)
            var leasedBytes = s.tenantLeased[tenant] ?? 0
            for address in addresses {
                // Not in RAM: on disk, or the cached prefix ends here; `locate` tells which.
                guard let resident = s.resident[address] else { return nil }
                served.append(ServedPage(extent: resident.extent, tokens: resident.tokens))
                if resident.leases == 0 { leasedBytes += resident.extent.length }
            }
            // Over the tenant's quota: the async path serves what fits.
            guard leasedBytes <= configuration.tenantRAMQuotaBytes else { return .some(nil) }
            for address in addresses { _ = s.lease(address, now: now) }
            let id = s.leases.add(Lease(tenant: tenant, owner: owner, pages: addresses, staging: []))
            s.counters.gets += 1
            let servedTokens = maxTokens > 0 ? min(pageCount * size, maxTokens) : pageCount * size
            return GetResult(tokens: servedTokens, leaseID: id, pages: served)
        }
        switch leased {
        case .some(let result): return result
        case .none: return try getResidentLocating(tenant, owner: owner, model: model, tokens: tokens, maxTokens: maxTokens)
        }
    }

    /// `getResident` for the general case: the prefix as `locate` finds it (partial pages, pages
    /// on disk, the end of the cached prefix), leased only if all of it is in RAM.
    private func getResidentLocating(_ tenant: TenantID, owner: UInt64, model: ModelSpec, tokens: [UInt32], maxTokens: Int) throws(StoreError) -> GetResult? {
        var located = locate(tenant, model, tokens)
        if maxTokens > 0 {
            located = located.filter { $0.tokens.lowerBound < maxTokens }
        }
        guard located.allSatisfy({ $0.tier == .ram }) else { return nil }
        let now = Clocks.monotonicMicros()
        return state.withLock { s -> GetResult? in
            guard s.ramBytes <= configuration.ramBudgetBytes,
                  s.leases.refusal(tenant: tenant, owner: owner, configuration) == nil else { return nil }
            var served: [ServedPage] = []
            served.reserveCapacity(located.count)
            // All or nothing: a page evicted since `locate` sends the request down the async path.
            var leasedBytes = s.tenantLeased[tenant] ?? 0
            for page in located {
                guard let resident = s.resident[page.address] else { return nil }
                served.append(ServedPage(extent: resident.extent, tokens: resident.tokens))
                if resident.leases == 0 { leasedBytes += resident.extent.length }
            }
            guard leasedBytes <= configuration.tenantRAMQuotaBytes else { return nil }
            for page in located { _ = s.lease(page.address, now: now) }
            let id = s.leases.add(Lease(tenant: tenant, owner: owner, pages: located.map(\.address), staging: []))
            s.counters.gets += 1
            let servedTokens = located.last.map { maxTokens > 0 ? min($0.tokens.upperBound, maxTokens) : $0.tokens.upperBound } ?? 0
            return GetResult(tokens: servedTokens, leaseID: id, pages: served)
        }
    }

    /// A non-durable `put` of whole pages (`dataStart` on a page boundary, so no stored partial
    /// page is merged or dropped) whose new pages fit the RAM budget; nil otherwise, and for any
    /// request the async path would refuse (it words the error). Throws only once it has
    /// claimed the staging extents (the tenant's memory is full), as `put` would.
    public func putResident(
        _ tenant: TenantID, owner: UInt64, modelID: UInt64, tokens: [UInt32], dataStart: Int, chunks: [PutChunk]
    ) throws(StoreError) -> PutResult? {
        guard let model = try? model(modelID) else { return nil }
        let size = model.pageTokens
        guard !tokens.isEmpty, dataStart >= 0, dataStart <= tokens.count, dataStart % size == 0 else { return nil }
        let located = locate(tenant, model, tokens)
        let cached = located.last?.tokens.upperBound ?? 0
        guard dataStart <= cached else { return nil }
        // A stored partial page this put supersedes must be dropped: the async path does that.
        if let last = located.last, last.tokens.lowerBound >= dataStart,
           last.tokens.upperBound < min(last.tokens.lowerBound + size, tokens.count) { return nil }
        let firstPage = dataStart / size
        let pageCount = tokens.count == dataStart ? 0 : (tokens.count - 1) / size - firstPage + 1
        guard chunks.count == pageCount, let memory = try? memory(for: tenant) else { return nil }

        // Keys, sizes and the pages already stored, before anything changes.
        var parent: PageKey? = firstPage == 0 ? nil : located[firstPage - 1].address.key
        var pages: [(address: PageAddress, tokens: Range<Int>, stored: Bool)] = []
        var projectedBytes = 0
        for (index, chunk) in chunks.enumerated() {
            let pageStart = (firstPage + index) * size
            let pageEnd = min(pageStart + size, tokens.count)
            let key = PageKeyChain.key(parent: parent, modelID: model.id, tokens: tokens[pageStart..<pageEnd])
            parent = key
            let address = PageAddress(tenant: tenant, key: key)
            let stored = tier(of: address) != nil
            pages.append((address, pageStart..<pageEnd, stored))
            guard !stored else { continue }
            let chunkBytes = (pageEnd - pageStart) * model.bytesPerToken
            // Lengths are a client's to choose: summed with overflow checked (the async path
            // refuses what is not an extent of this connection).
            let chunkRAMBytes: Int
            switch chunk {
            case .extent(let e):
                guard e.length >= chunkBytes else { return nil }
                chunkRAMBytes = (chunkBytes + 4095) & ~4095
            case .bytes(let b):
                guard b.count == chunkBytes else { return nil }
                chunkRAMBytes = (chunkBytes + 4095) & ~4095
            }
            let (sum, overflow) = projectedBytes.addingReportingOverflow(chunkRAMBytes)
            guard !overflow else { return nil }
            projectedBytes = sum
        }
        let fits = state.withLock {
            projectedBytes <= configuration.ramBudgetBytes - $0.ramBytes
                && projectedBytes <= configuration.tenantRAMQuotaBytes - ($0.tenantRAM[tenant] ?? 0)
        }
        guard fits else { return nil }
        guard (try? claimStaging(tenant, owner: owner, chunks, memory)) != nil else { return nil }

        // From here on the put happens; the cleanup mirrors `put`'s.
        var newPages: [(PageAddress, Resident)] = []
        var stored = false
        defer {
            for case .extent(let e) in chunks { memory.freeStaging(e) }
            if !stored {
                for (_, page) in newPages { memory.free(page.extent) }
            }
        }
        var deduplicated = 0
        for (page, chunk) in zip(pages, chunks) {
            if page.stored {
                deduplicated += 1
                continue
            }
            // Copied, never adopted: the client can write its staging memory at any time.
            let chunkBytes = page.tokens.count * model.bytesPerToken
            guard let extent = memory.allocate(chunkBytes) else { throw .overBudget(pageArenaFull(memory)) }
            let source = switch chunk {
            case .extent(let e): memory.stagingBuffer(e)
            case .bytes(let b): b
            }
            memory.buffer(extent).bytes.copyMemory(from: UnsafeRawBufferPointer(rebasing: source.readOnly[0..<chunkBytes]))
            let now = Clocks.monotonicMicros()
            newPages.append((page.address, Resident(extent: extent, modelID: model.id, tokens: page.tokens.count,
                                                    lastAccessMicros: now, residentSinceMicros: now, onDisk: false)))
        }
        stored = true
        let overBudget = commit(&newPages, deduplicated: deduplicated, memory)
        // Concurrent puts passed the budget check together: evict off this thread, as the
        // async path would have before replying.
        if overBudget { Task { await self.makeRoom() } }
        return PutResult(cachedTokens: max(cached, tokens.count), newPages: newPages.count)
    }
}
