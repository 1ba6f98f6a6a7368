#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import Dispatch
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

    /// Ends a lease: its pages may be evicted again (the background evictor is woken if it
    /// stopped with every candidate leased), unused staging extents are freed.
    public func release(_ tenant: TenantID, leaseID: UInt64) throws(StoreError) {
        let (lease, wake) = state.withLock { s -> (Lease?, Bool) in
            guard let lease = s.leases[leaseID], lease.tenant == tenant else { return (nil, false) }
            _ = s.leases.remove(leaseID)
            for address in lease.pages { s.endLease(address) }
            // Only an evictor that stalled on leased pages needs waking: the common RELEASE
            // after a GET costs nothing more.
            let wake = s.evictionStalled && !lease.pages.isEmpty
            if wake { s.evictionStalled = false }
            return (lease, wake)
        }
        guard let lease else { throw .notFound("no lease \(leaseID) of this tenant (already released, or its connection closed): release each lease once") }
        if !lease.staging.isEmpty, let memory = try? memory(for: tenant) {
            for extent in lease.staging { memory.freeStaging(extent) }
        }
        if wake { scheduleEviction() }
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
        try await beginPut(tenant, owner: owner, modelID: modelID, tokens: tokens, dataStart: dataStart, chunks: chunks,
                           durable: durable, session: session).value()
    }

    /// One page a put covers.
    struct PutPage {
        var address: PageAddress
        var tokens: Range<Int>
        /// Where this put's data for the page starts (after `tokens.lowerBound` when it continues
        /// a stored partial page, whose rows before it are reused).
        var chunkStart: Int
        /// The page is stored already (in either tier): nothing to copy.
        var stored: Bool
        /// The stored partial page whose rows this page reuses.
        var completes: PageAddress?
    }

    /// A put, planned once (one `locate`, the chain hashed once), its staging extents claimed.
    struct PutPlan {
        var tenant: TenantID
        var model: ModelSpec
        var memory: any PageMemory
        var tokens: [UInt32]
        var located: [PageRef]
        var firstPage: Int
        var pages: [PutPage]
        var chunks: [PutChunk]
        /// Stored pages this put supersedes (shorter partial pages of the same tokens).
        var dropped: [PageAddress]
        /// RAM the new pages take.
        var newBytes: Int
        var durable: Bool
        var session: String?

        var cached: Int { located.last?.tokens.upperBound ?? 0 }
    }

    /// A `PUT`, planned once. It is finished at once (`done`) when it only copies whole new pages
    /// into RAM that has room for them, as most puts do: the background evictor keeps room
    /// (`evictionHeadroomBytes`). Merging with a stored partial page, dropping a superseded one,
    /// durability, a session, or RAM with no room left make it `pending`.
    public func beginPut(
        _ tenant: TenantID, owner: UInt64, modelID: UInt64, tokens: [UInt32], dataStart: Int, chunks: [PutChunk], durable: Bool,
        session: String? = nil
    ) throws(StoreError) -> Outcome<PutResult> {
        let model = try model(modelID)
        let size = model.pageTokens
        guard !tokens.isEmpty else { throw .invalidArgument("PUT carries no tokens: send at least one") }
        guard dataStart >= 0, dataStart <= tokens.count else {
            throw .invalidArgument("dataStart \(dataStart) is outside the \(tokens.count) tokens: send data from a token of the sequence")
        }
        if let session { try Session.validate(name: session) }
        // Every page's key, the short last one included, hashed once.
        let keys = PageKeyChain.keys(modelID: model.id, tokens: tokens, pageTokens: size)
        let located = locate(tenant, model, tokens, keys: Array(keys.prefix(tokens.count / size)))
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
        let plan: PutPlan
        do throws(StoreError) {
            plan = try planPut(tenant, model, memory, tokens, keys: keys, located: located, dataStart: dataStart, chunks: chunks,
                               durable: durable, session: session)
        } catch {
            for case .extent(let e) in chunks { memory.freeStaging(e) }
            throw error
        }
        if !durable, session == nil, plan.dropped.isEmpty, plan.pages.allSatisfy({ $0.stored || $0.completes == nil }), hasRoom(for: plan) {
            defer { for case .extent(let e) in chunks { memory.freeStaging(e) } }
            return .done(try finishPut(plan, heads: [:]))
        }
        return .pending { [self] () async throws(StoreError) -> PutResult in
            defer { for case .extent(let e) in chunks { memory.freeStaging(e) } }
            return try await finishPutWaiting(plan)
        }
    }

    /// The pages a put covers, what it supersedes, and its chunks' sizes checked.
    private func planPut(_ tenant: TenantID, _ model: ModelSpec, _ memory: any PageMemory, _ tokens: [UInt32], keys: [PageKey],
                         located: [PageRef], dataStart: Int, chunks: [PutChunk], durable: Bool, session: String?) throws(StoreError) -> PutPlan {
        let size = model.pageTokens
        let firstPage = dataStart / size
        var plan = PutPlan(tenant: tenant, model: model, memory: memory, tokens: tokens, located: located, firstPage: firstPage,
                           pages: [], chunks: chunks, dropped: [], newBytes: 0, durable: durable, session: session)
        let addresses = keys[firstPage..<firstPage + chunks.count].map { PageAddress(tenant: tenant, key: $0) }
        for (index, chunk) in chunks.enumerated() {
            let pageStart = (firstPage + index) * size
            let pageEnd = min(pageStart + size, tokens.count)
            let chunkStart = max(pageStart, dataStart)
            let address = addresses[index]
            // The page `locate` found where this one starts (`located[j]` starts at page j: whole
            // pages in order, then a partial one): this page itself when its key matches, or the
            // stored partial page it continues. Indexed, not searched: a put of many small pages
            // must not cost pages × pages. A page another put stores meanwhile is caught at
            // `commit` (kept once).
            let storedHere = firstPage + index < located.count ? located[firstPage + index] : nil
            // The page a previous put ended on is superseded by this longer one, whether the
            // longer page is new or was stored already, and whether the data resends its
            // first rows or not: keep no duplicate.
            if let storedHere, storedHere.tokens.upperBound < pageEnd {
                plan.dropped.append(storedHere.address)
            } else if index == 0, chunkStart > pageStart {
                let candidates = PageKeyChain.partialKeys(parent: pageStart == 0 ? nil : keys[firstPage - 1], modelID: model.id,
                                                          tokens: tokens[pageStart..<pageEnd - 1])
                if let (shorter, _, _) = longestStored(tenant, candidates) { plan.dropped.append(shorter) }
            }
            let stored = storedHere?.address == address
            plan.pages.append(PutPage(address: address, tokens: pageStart..<pageEnd, chunkStart: chunkStart, stored: stored,
                                      completes: chunkStart > pageStart ? storedHere?.address : nil))
            guard !stored else { continue }
            let chunkBytes = (pageEnd - chunkStart) * model.bytesPerToken
            switch chunk {
            case .extent(let e):
                guard e.length >= chunkBytes else {
                    throw .invalidArgument("extent \(index) (\(e)) holds \(e.length) bytes, its chunk (tokens \(chunkStart)..<\(pageEnd)) needs \(chunkBytes): ALLOC at least that for it (docs/protocol.md, PUT)")
                }
            case .bytes(let b):
                guard b.count == chunkBytes else {
                    throw .invalidArgument("inline chunk \(index) holds \(b.count) bytes, its tokens \(chunkStart)..<\(pageEnd) need exactly \(chunkBytes): cut inline data at page boundaries (docs/protocol.md, PUT)")
                }
            }
            if chunkStart > pageStart, storedHere == nil {
                throw .notFound("the cached partial page at token \(pageStart) is gone (evicted or replaced since LOOKUP): look up again and put from the cached length")
            }
            plan.newBytes += Self.extentBytes((pageEnd - pageStart) * model.bytesPerToken)
        }
        return plan
    }

    /// Whether RAM and the tenant's quota have room for the put's new pages now.
    private func hasRoom(for plan: PutPlan) -> Bool {
        state.withLock { s in
            plan.newBytes <= configuration.ramBudgetBytes - s.ramBytes
                && plan.newBytes <= configuration.tenantRAMQuotaBytes - (s.tenantRAM[plan.tenant] ?? 0)
        }
    }

    /// The rest of a put that may wait: for room in RAM, for the stored partial page it
    /// continues (read from disk if it was evicted), for its pages to be durable.
    private func finishPutWaiting(_ plan: PutPlan) async throws(StoreError) -> PutResult {
        if !hasRoom(for: plan) {
            state.withLock { $0.counters.putsWaited += 1 }
            await makeRoom(reserving: (plan.tenant, plan.newBytes))
        }
        // Rows before `chunkStart` come from the stored partial page being completed.
        var heads: [PageAddress: (buffer: PageBuffer, tokens: Int, held: Bool)] = [:]
        // Their holds end once their rows are copied: a completed page is dropped below.
        func endHeadHolds() { for (address, head) in heads where head.held { endHold(address) } }
        for page in plan.pages where !page.stored {
            guard let completes = page.completes else { continue }
            guard let head = await residentBuffer(completes, plan.model, plan.memory) else {
                endHeadHolds()
                throw .notFound("the cached partial page at token \(page.tokens.lowerBound) is gone (evicted or replaced since LOOKUP): look up again and put from the cached length")
            }
            heads[completes] = head
        }
        let result: PutResult
        do throws(StoreError) {
            result = try finishPut(plan, heads: heads)
        } catch {
            endHeadHolds()
            throw error
        }
        endHeadHolds()
        // A put bigger than the room eviction could make ahead of it leaves RAM over budget:
        // it waits until the budget holds again, as it waited for room before.
        if state.withLock({ $0.ramBytes > configuration.ramBudgetBytes }) { await makeRoom() }
        if let session = plan.session {
            // Every page of the session, stored by this put or before (by anyone), must be on
            // disk before the catalog names it (without a disk tier, sessions last as long as
            // the process). Then the catalog holds them, so no drop can take one away; a page
            // dropped before that makes the put fail rather than name a page that is gone.
            let chain = plan.located.prefix(plan.firstPage).map(\.address) + plan.pages.map(\.address)
            if disk != nil { try await makeDurable(chain) }
            let id = SessionID(tenant: plan.tenant, name: session)
            let previous = try catalog.store(id, model: plan.model, tokens: plan.tokens, now: Clocks.wallMicros())
            if let gone = inEitherTier(chain).firstIndex(of: false) {
                try catalog.revert(id, to: previous)
                throw .invalidArgument("page \(gone) of session '\(session)' was replaced by another put while this one ran: put again")
            }
        } else if plan.durable {
            try await makeDurable(plan.pages.map(\.address))
        }
        // A completed partial page is superseded by the longer one: keep no duplicate (`drop`
        // leaves it while a session holds it or a client leases it).
        for address in plan.dropped { await drop(address) }
        return result
    }

    /// Copies the put's new pages into RAM (merging the rows of completed partial pages from
    /// `heads`) and makes them resident; wakes the background evictor when RAM runs short.
    private func finishPut(_ plan: PutPlan, heads: [PageAddress: (buffer: PageBuffer, tokens: Int, held: Bool)]) throws(StoreError) -> PutResult {
        let model = plan.model, memory = plan.memory
        var newPages: [(PageAddress, Resident)] = []
        var committed = false
        defer { if !committed { for (_, page) in newPages { memory.free(page.extent) } } }
        var deduplicated = 0
        var copies: [(destination: PageBuffer, source: PageBuffer, bytes: Int)] = []
        // A page the plan found stored may have left both tiers since (the disk budget, a drop,
        // an EVICT): its chunk is copied after all rather than skipped.
        let storedIndexes = plan.pages.indices.filter { plan.pages[$0].stored }
        var kept = Array(repeating: false, count: plan.pages.count)
        for (index, present) in zip(storedIndexes, inEitherTier(storedIndexes.map { plan.pages[$0].address })) { kept[index] = present }
        for (index, (page, chunk)) in zip(plan.pages, plan.chunks).enumerated() {
            if kept[index] {
                deduplicated += 1
                continue
            }
            let chunkBytes = (page.tokens.upperBound - page.chunkStart) * model.bytesPerToken
            if page.stored {
                // Not checked at plan time (a stored page's chunk is not read).
                let length = switch chunk {
                case .extent(let e): e.length
                case .bytes(let b): b.count
                }
                guard length >= chunkBytes, page.completes == nil else {
                    throw .notFound("page \(index) of this put left both tiers while it ran (the disk budget or an EVICT deleted it): put again")
                }
            }
            // Copied, never adopted: the client can write its staging memory at any time.
            let source = switch chunk {
            case .extent(let e): memory.stagingBuffer(e)
            case .bytes(let b): b
            }
            guard let extent = memory.allocate(page.tokens.count * model.bytesPerToken) else { throw .overBudget(pageArenaFull(memory)) }
            if let completes = page.completes {
                let head = heads[completes]!
                Self.merge(model: model, head: head.buffer, headStored: head.tokens, headUsed: page.chunkStart - page.tokens.lowerBound,
                           tail: source, tailTokens: page.tokens.upperBound - page.chunkStart, into: memory.buffer(extent))
            } else {
                copies.append((memory.buffer(extent), source, chunkBytes))
            }
            let now = Clocks.monotonicMicros()
            newPages.append((page.address, Resident(extent: extent, modelID: model.id, tokens: page.tokens.count,
                                                    lastAccessMicros: now, residentSinceMicros: now, onDisk: false)))
        }
        Self.copy(copies)
        offerCodecSample(plan, newPages)
        committed = true
        commit(&newPages, deduplicated: deduplicated, memory)
        scheduleEviction()
        return PutResult(cachedTokens: max(plan.cached, plan.tokens.count), newPages: newPages.count)
    }

    /// Hands the codec policy the full pages it wants of this put (copies of a few layers, for
    /// the first pages of a model and one sample in `checkEvery` pages after).
    private func offerCodecSample(_ plan: PutPlan, _ newPages: [(PageAddress, Resident)]) {
        let full = newPages.filter { $0.1.tokens == plan.model.pageTokens }
        let wanted = codecPolicy.pagesWanted(for: plan.model, tenant: plan.tenant, fullPages: full.count)
        guard wanted > 0 else { return }
        codecPolicy.offer(full.prefix(wanted).map { plan.memory.buffer($0.1.extent).readOnly }, model: plan.model, tenant: plan.tenant)
    }

    /// Copies each source's first `bytes` into its destination. A put of many megabytes is the
    /// whole cost of a RAM-tier PUT and its client waits meanwhile, so from `parallelCopyBytes`
    /// on the bytes are split evenly between up to `copyThreads` threads (both cores of a small
    /// host: one copy runs at a core's memory bandwidth, about half what two reach).
    /// `threads`: how many to split between (tests pass it; nil: as above, from the cores).
    static func copy(_ copies: [(destination: PageBuffer, source: PageBuffer, bytes: Int)], threads fixed: Int? = nil) {
        let total = copies.reduce(0) { $0 + $1.bytes }
        let threads = fixed ?? (total < parallelCopyBytes ? 1 : max(1, min(copyThreads, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))))
        // Prefix sums of the copies' lengths: thread i copies bytes [i·total/n, (i+1)·total/n)
        // of their concatenation, whatever page boundaries fall inside.
        var sums: [Int] = [0]
        for copy in copies { sums.append(sums.last! + copy.bytes) }
        let starts = sums
        @Sendable func copyRange(_ range: Range<Int>) {
            var index = max(0, (starts.firstIndex { $0 > range.lowerBound } ?? starts.count) - 1)
            var at = range.lowerBound
            while at < range.upperBound, index < copies.count {
                let copy = copies[index]
                let from = at - starts[index], to = min(copy.bytes, range.upperBound - starts[index])
                if from < to {
                    UnsafeMutableRawBufferPointer(rebasing: copy.destination.bytes[from..<to])
                        .copyMemory(from: UnsafeRawBufferPointer(rebasing: copy.source.readOnly[from..<to]))
                }
                at = starts[index] + to
                index += 1
            }
        }
        if threads == 1 { return copyRange(0..<total) }
        DispatchQueue.concurrentPerform(iterations: threads) { i in
            copyRange(total * i / threads..<total * (i + 1) / threads)
        }
    }

    /// From this many bytes a put's copy is split between threads (below, the hand-off costs
    /// more than it saves).
    static let parallelCopyBytes = 4 << 20
    /// Most threads one put's copy uses.
    static let copyThreads = 4

    /// Writes `addresses` to disk where they are only in RAM, as one group commit, and waits
    /// until they are durable; fails if one is in neither tier (evicted and deleted while the put
    /// ran).
    func makeDurable(_ addresses: [PageAddress]) async throws(StoreError) {
        guard let disk else { throw .unavailable("no disk tier is configured: durable puts need one") }
        for result in await persist(addresses, durable: true) {
            if case .failure(let error) = result { throw error }
        }
        if let index = disk.containsEach(addresses, skipping: addresses.map { _ in false }).firstIndex(of: false) {
            throw .unavailable("page \(index) of the sequence left both tiers while the put ran (the disk budget deleted it): put again")
        }
    }

    /// Makes a put's prepared pages resident and counts the put. A page another put stored
    /// meanwhile keeps that copy: this put's copy leaves `newPages` and is freed here.
    func commit(_ newPages: inout [(PageAddress, Resident)], deduplicated: Int, _ memory: any PageMemory) {
        let raced = state.withLock { s -> [Extent] in
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
            return raced
        }
        for extent in raced { memory.free(extent) }
        let racedSet = Set(raced)
        newPages.removeAll { racedSet.contains($0.1.extent) }
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
