import KVTierCodec
import KVTierCore
import Synchronization

extension TieredStore {
    /// Data for a `put`: an extent of the tenant's memory obtained with `allocate` (adopted
    /// without a copy when it holds a whole page), or bytes sent inline.
    public enum PutChunk: Sendable {
        case extent(Extent)
        case bytes(PageBuffer)
    }

    public struct PutResult: Sendable, Equatable {
        public var cachedTokens: Int
        public var newPages: Int
    }

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

    // MARK: allocate / release

    /// Staging extents for a put, owned by a lease of `owner` (a connection) until consumed by
    /// `put` or released. They lie in the tenant's staging arena, bounded by its staging limit.
    public func allocate(_ tenant: TenantID, owner: UInt64, sizes: [Int]) throws(StoreError) -> (leaseID: UInt64, extents: [Extent]) {
        let memory = try memory(for: tenant)
        if let refusal = state.withLock({ $0.leases.refusal(tenant: tenant, owner: owner, configuration) }) { throw .overBudget(refusal) }
        var extents: [Extent] = []
        for size in sizes {
            guard size > 0, let extent = memory.allocateStaging(size) else {
                for e in extents { memory.freeStaging(e) }
                throw .overBudget("the tenant's staging arena (\(ByteCount(memory.stagingCapacity)), the staging limit stagingSize) has no free extent of \(size) bytes: PUT or RELEASE what is staged first, put in smaller batches, or raise stagingSize")
            }
            extents.append(extent)
        }
        let id = state.withLock { s -> UInt64? in
            guard s.leases.refusal(tenant: tenant, owner: owner, configuration) == nil else { return nil }
            return s.leases.add(Lease(tenant: tenant, owner: owner, pages: [], staging: Set(extents)))
        }
        guard let id else {
            for e in extents { memory.freeStaging(e) }
            throw .overBudget(state.withLock { $0.leases.refusal(tenant: tenant, owner: owner, configuration) } ?? "too many leases: RELEASE some")
        }
        return (id, extents)
    }

    /// Ends a lease: its pages may be evicted again, unused staging extents are freed.
    public func release(_ tenant: TenantID, leaseID: UInt64) throws(StoreError) {
        let lease = state.withLock { s -> Lease? in
            guard let lease = s.leases[leaseID], lease.tenant == tenant else { return nil }
            _ = s.leases.remove(leaseID)
            for address in lease.pages { s.endLease(address) }
            return lease
        }
        guard let lease else { throw .notFound("lease \(leaseID) of this tenant (already released, or its connection closed): release each lease once") }
        if !lease.staging.isEmpty, let memory = try? memory(for: tenant) {
            for extent in lease.staging { memory.freeStaging(extent) }
        }
    }

    /// Releases every lease `owner` holds (its connection closed): work in proportion to those.
    public func releaseAll(owner: UInt64) {
        let ids = state.withLock { s in s.leases.ids(of: owner).compactMap { id in s.leases[id].map { (id, $0.tenant) } } }
        for (id, tenant) in ids { try? release(tenant, leaseID: id) }
    }

    // MARK: put

    /// Stores the KV of `tokens[dataStart...]` (tokens before `dataStart` must be cached) and
    /// returns the cached length after the put. `chunks` follow docs/protocol.md: the first runs
    /// from `dataStart` to the end of its page, then whole pages, then the rest.
    ///
    /// With a `session` name the put also sets that session of the tenant to `tokens` (creating
    /// it), and is durable: every page of `tokens` is on disk and the session in the catalog
    /// before it returns.
    public func put(
        _ tenant: TenantID, owner: UInt64, modelID: UInt64, tokens: [UInt32], dataStart: Int, chunks: [PutChunk], durable: Bool,
        session: String? = nil
    ) async throws(StoreError) -> PutResult {
        let model = try model(modelID)
        let size = model.pageTokens
        guard !tokens.isEmpty, dataStart >= 0, dataStart <= tokens.count else {
            throw .invalidArgument("dataStart \(dataStart) is outside the \(tokens.count) tokens")
        }
        if let session { try Session.validate(name: session) }
        let located = locate(tenant, model, tokens)
        let cached = located.last?.tokens.upperBound ?? 0
        guard dataStart <= cached else {
            throw .invalidArgument("data starts at token \(dataStart) but only \(cached) tokens are cached: send data from \(cached) or earlier")
        }
        let firstPage = dataStart / size
        let pageCount = tokens.count == dataStart ? 0 : (tokens.count - 1) / size - firstPage + 1
        guard chunks.count == pageCount else {
            throw .invalidArgument("\(chunks.count) data chunks for tokens \(dataStart)..<\(tokens.count); pages of \(size) tokens need \(pageCount)")
        }
        let memory = try memory(for: tenant)
        try claimStaging(tenant, owner: owner, chunks, memory)

        var parent: PageKey? = firstPage == 0 ? nil : located[firstPage - 1].address.key
        var newPages: [(PageAddress, Resident)] = []
        var dropped: [PageAddress] = []
        // Every page the data covers, new or stored already: what durability is about.
        var covered: [PageAddress] = []
        var deduplicated = 0
        // Claimed staging extents belong to this put now and are freed when it ends (their
        // bytes are copied, never adopted: clients can write staging memory at any time); on
        // failure the page extents prepared are freed too.
        var stored = false
        defer {
            for case .extent(let e) in chunks { memory.freeStaging(e) }
            if !stored {
                for (_, page) in newPages { memory.free(page.extent) }
            }
        }
        for (index, chunk) in chunks.enumerated() {
            let pageStart = (firstPage + index) * size
            let pageEnd = min(pageStart + size, tokens.count)
            let chunkStart = max(pageStart, dataStart)
            let key = PageKeyChain.key(parent: parent, modelID: model.id, tokens: tokens[pageStart..<pageEnd])
            let address = PageAddress(tenant: tenant, key: key)
            covered.append(address)
            // The stored page this chunk continues (its rows before `chunkStart` are reused).
            let stored = located.first(where: { $0.tokens.lowerBound == pageStart })
            let completed = chunkStart > pageStart ? stored : nil
            // The page a previous put ended on is superseded by this longer one, whether the
            // longer page is new or was stored already, and whether the data resends its
            // first rows or not: keep no duplicate.
            if let stored, stored.tokens.upperBound < pageEnd {
                dropped.append(stored.address)
            } else if index == 0, chunkStart > pageStart, let (shorter, _) = PageKeyChain.longestStoredPrefix(
                parent: parent, modelID: model.id, tokens: tokens[pageStart..<pageEnd - 1],
                exists: { tier(of: PageAddress(tenant: tenant, key: $0)) != nil }) {
                dropped.append(PageAddress(tenant: tenant, key: shorter))
            }
            parent = key
            if tier(of: address) != nil {
                deduplicated += 1
                continue
            }
            let chunkBytes = (pageEnd - chunkStart) * model.bytesPerToken
            let source: PageBuffer
            switch chunk {
            case .extent(let e):
                guard e.length >= chunkBytes else { throw .invalidArgument("extent \(e) holds \(e.length) bytes, chunk needs \(chunkBytes)") }
                source = memory.stagingBuffer(e)
            case .bytes(let b):
                guard b.count == chunkBytes else { throw .invalidArgument("inline chunk \(index) holds \(b.count) bytes, needs \(chunkBytes)") }
                source = b
            }
            guard let extent = memory.allocate((pageEnd - pageStart) * model.bytesPerToken) else {
                throw .overBudget(pageArenaFull(memory))
            }
            // Rows before `chunkStart` come from the stored partial page being completed.
            if chunkStart > pageStart {
                guard let stored = completed, let buffer = await residentBuffer(stored.address, model, memory) else {
                    memory.free(extent)
                    throw .notFound("the cached partial page at token \(pageStart) (evicted or replaced since LOOKUP): look up again and put from the cached length")
                }
                Self.merge(model: model, head: buffer.buffer, headStored: buffer.tokens, headUsed: chunkStart - pageStart,
                           tail: source, tailTokens: pageEnd - chunkStart, into: memory.buffer(extent))
                if buffer.leased { unlease(stored.address) }
            } else {
                memory.buffer(extent).bytes.copyMemory(from: UnsafeRawBufferPointer(rebasing: source.readOnly[0..<chunkBytes]))
            }
            let now = Clocks.monotonicMicros()
            newPages.append((address, Resident(extent: extent, modelID: model.id, tokens: pageEnd - pageStart,
                                               lastAccessMicros: now, residentSinceMicros: now, onDisk: false)))
        }
        stored = true
        commit(&newPages, deduplicated: deduplicated, memory)
        if let session {
            // Every page of the session, stored by this put or before (by anyone), must be on
            // disk before the catalog names it (without a disk tier, sessions last as long as
            // the process). Then the catalog holds them, so no drop can take one away; a page
            // dropped before that makes the put fail rather than name a page that is gone.
            let chain = located.prefix(firstPage).map(\.address) + covered
            if disk != nil { try await makeDurable(chain) }
            let id = SessionID(tenant: tenant, name: session)
            let previous = try catalog.store(id, model: model, tokens: tokens, now: Clocks.wallMicros())
            if let gone = chain.firstIndex(where: { tier(of: $0) == nil }) {
                try catalog.revert(id, to: previous)
                throw .invalidArgument("page \(gone) of session '\(session)' was replaced by another put while this one ran: put again")
            }
        } else if durable {
            try await makeDurable(covered)
        }
        // A completed partial page is superseded by the longer one: keep no duplicate (`drop`
        // leaves it while a session holds it or a client leases it).
        for address in dropped { await drop(address) }
        await makeRoom()
        return PutResult(cachedTokens: max(cached, tokens.count), newPages: newPages.count)
    }

    /// Writes `addresses` to disk where they are only in RAM and waits until they are durable;
    /// fails if one is in neither tier (evicted and deleted while the put ran).
    func makeDurable(_ addresses: [PageAddress]) async throws(StoreError) {
        guard let disk else { throw .unavailable("no disk tier is configured: durable puts need one") }
        for (index, address) in addresses.enumerated() {
            try await persist(address)
            guard disk.contains(address) else {
                throw .unavailable("page \(index) of the sequence left both tiers while the put ran (the disk budget deleted it): put again")
            }
        }
    }

    /// Makes a put's prepared pages resident and counts the put. A page another put stored
    /// meanwhile keeps that copy: this put's copy leaves `newPages` and is freed here. Returns
    /// whether RAM is over budget.
    @discardableResult
    func commit(_ newPages: inout [(PageAddress, Resident)], deduplicated: Int, _ memory: any PageMemory) -> Bool {
        let (raced, overBudget) = state.withLock { s -> ([Extent], Bool) in
            var raced: [Extent] = []
            for (address, page) in newPages {
                if s.resident[address] != nil {
                    raced.append(page.extent)
                    continue
                }
                s.insertResident(address, page)
            }
            s.counters.puts += 1
            s.counters.pagesStored += newPages.count - raced.count
            s.counters.pagesDeduplicated += deduplicated + raced.count
            return (raced, s.ramBytes > configuration.ramBudgetBytes)
        }
        for extent in raced { memory.free(extent) }
        let racedSet = Set(raced)
        newPages.removeAll { racedSet.contains($0.1.extent) }
        return overBudget
    }

    /// Takes the staging extents a put names out of the owner's leases; refuses any other. Costs
    /// a hash lookup per extent, whatever leases others hold.
    func claimStaging(_ tenant: TenantID, owner: UInt64, _ chunks: [PutChunk], _ memory: any PageMemory) throws(StoreError) {
        let named = chunks.compactMap { if case .extent(let e) = $0 { e } else { nil } }
        guard !named.isEmpty else { return }
        // Two pages must never share memory: each staging extent backs one chunk.
        var seen = Set<Extent>()
        for extent in named where !seen.insert(extent).inserted {
            throw .invalidArgument("extent \(extent) is named twice in one PUT: give every chunk its own extent from ALLOC")
        }
        let missing = state.withLock { s -> Extent? in
            if let missing = named.first(where: { !s.leases.holdsStaging($0, tenant: tenant, owner: owner) }) { return missing }
            for extent in named { s.leases.consumeStaging(extent, tenant: tenant) }
            return nil
        }
        if let missing { throw .invalidArgument("extent \(missing) is not a staging extent of this connection: get it from ALLOC") }
    }

    /// The error of a page arena with no room: names the limit behind it.
    func pageArenaFull(_ memory: any PageMemory) -> String {
        "the tenant's page arena (\(ByteCount(memory.capacity)), sized from the tenant RAM quota tenantRAMQuota) has no free extent: release leases, evict pages, or raise tenantRAMQuota"
    }

    /// Copies `headUsed` rows of a stored page (which holds `headStored` rows) and then
    /// `tailTokens` rows of a chunk into a page of `headUsed + tailTokens` rows, layer by layer.
    static func merge(model: ModelSpec, head: PageBuffer, headStored: Int, headUsed: Int,
                      tail: PageBuffer, tailTokens: Int, into out: PageBuffer) {
        let row = model.kvHeads * model.headDim * model.elementType.byteWidth
        let total = headUsed + tailTokens
        var at = 0
        for layer in 0..<model.layers {
            for part in 0..<2 {
                let headBase = (layer * 2 + part) * headStored * row
                let tailBase = (layer * 2 + part) * tailTokens * row
                UnsafeMutableRawBufferPointer(rebasing: out.bytes[at..<at + headUsed * row])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: head.readOnly[headBase..<headBase + headUsed * row]))
                at += headUsed * row
                UnsafeMutableRawBufferPointer(rebasing: out.bytes[at..<at + tailTokens * row])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: tail.readOnly[tailBase..<tailBase + tailTokens * row]))
                at += tailTokens * row
            }
        }
        precondition(at == total * row * 2 * model.layers)
    }
}
