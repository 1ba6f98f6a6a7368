import KVTierCore
import Synchronization

extension TieredStore {
    /// A session with where its pages are now.
    public struct SessionDetail: Sendable, Equatable {
        public var session: Session
        /// Leading tokens of the session cached, split over the tiers (a prefix whose pages
        /// were evicted from disk is shorter than the session).
        public var ramTokens: Int
        public var diskTokens: Int
    }

    /// A session resumed: its sequence, and the prefetch loading its disk pages into RAM (nil
    /// when every cached page is in RAM already).
    public struct ResumedSession: Sendable {
        public var session: Session
        public var prefetch: Task<Int, Never>?
    }

    public func sessionDetail(_ tenant: TenantID, name: String) throws(StoreError) -> SessionDetail {
        try detail(liveSession(SessionID(tenant: tenant, name: name)))
    }

    /// The tenant's sessions, most recently used first.
    public func sessions(_ tenant: TenantID) -> [SessionDetail] {
        expireSessions()
        return catalog.sessions(of: tenant)
            .sorted { ($0.lastUsedMicros, $1.name) > ($1.lastUsedMicros, $0.name) }
            .compactMap { try? detail($0) }
    }

    /// Positions `range` of the tenant's live sessions, most recently used first, and how many
    /// it has: the work is a sort of the tenant's sessions (no page is looked at; where a
    /// session's pages are is `sessionDetail`'s), and no lock is held while sorting.
    public func sessionList(_ tenant: TenantID, offset: Int, limit: Int) -> (total: Int, sessions: [Session]) {
        let now = Clocks.wallMicros()
        // Expired ones are left to `expireSessions` (the daemon's timer, or the next use):
        // deleting them here would journal under the catalog's lock on a read.
        let live = catalog.sessions(of: tenant).filter { !$0.isExpired(atWallMicros: now) }
            .sorted { ($0.lastUsedMicros, $1.name) > ($1.lastUsedMicros, $0.name) }
        let start = min(live.count, max(0, offset))
        return (live.count, Array(live[start..<min(live.count, start + max(0, limit))]))
    }

    /// Resuming a session: marks it used and starts prefetching its disk pages (hottest
    /// first, up to half the RAM budget) so the GET that follows finds them in RAM.
    public func resumeSession(_ tenant: TenantID, name: String) throws(StoreError) -> ResumedSession {
        let id = SessionID(tenant: tenant, name: name)
        _ = try liveSession(id)
        let session = try catalog.touch(id, now: Clocks.wallMicros())
        let model = try model(session.modelID)
        return ResumedSession(session: session, prefetch: prefetch(tenant, model: model, tokens: session.tokens,
                                                                   budgetBytes: configuration.ramBudgetBytes / 2))
    }

    /// Pins or unpins a session. A pinned session's pages stay in RAM (they are loaded now) and
    /// on disk, and it never expires; pinned sessions together may hold half the RAM budget, and
    /// one tenant's half its RAM quota.
    public func setSessionPinned(_ tenant: TenantID, name: String, pinned: Bool) throws(StoreError) -> ResumedSession {
        let id = SessionID(tenant: tenant, name: name)
        let session = try liveSession(id)
        if pinned {
            let limit = configuration.ramBudgetBytes / 2
            let adding = catalog.unpinnedBytes(of: id)
            let after = catalog.pinnedBytes + adding
            guard after <= limit else {
                throw .overBudget("pinning '\(name)' would hold \(ByteCount(after)) in RAM; pinned sessions may hold half the RAM budget, \(ByteCount(limit)): unpin others or raise --ram-budget")
            }
            // Per tenant too, so one tenant's pins cannot take the whole pinned share.
            let tenantLimit = min(configuration.tenantRAMQuotaBytes, configuration.ramBudgetBytes) / 2
            let tenantAfter = catalog.pinnedBytes(of: tenant) + adding
            guard tenantAfter <= tenantLimit else {
                throw .overBudget("pinning '\(name)' would hold \(ByteCount(tenantAfter)) of this tenant's pages in RAM; a tenant's pinned sessions may hold half its RAM quota (tenantRAMQuota), \(ByteCount(tenantLimit)): unpin others or raise tenantRAMQuota")
            }
        }
        try catalog.setPinned(id, pinned, now: Clocks.wallMicros())
        guard pinned, let model = try? model(session.modelID) else { return ResumedSession(session: session, prefetch: nil) }
        return ResumedSession(session: session, prefetch: prefetch(tenant, model: model, tokens: session.tokens, budgetBytes: .max))
    }

    public func setSessionTTL(_ tenant: TenantID, name: String, seconds: UInt32) throws(StoreError) {
        let id = SessionID(tenant: tenant, name: name)
        _ = try liveSession(id)
        try catalog.setTTL(id, seconds: seconds, now: Clocks.wallMicros())
    }

    /// A copy of session `from` named `to`, sharing its pages until either is extended.
    public func forkSession(_ tenant: TenantID, from: String, to: String) throws(StoreError) -> SessionDetail {
        let source = SessionID(tenant: tenant, name: from)
        _ = try liveSession(source)
        return try detail(catalog.fork(source, to: SessionID(tenant: tenant, name: to), now: Clocks.wallMicros()))
    }

    /// Forgets a session; its pages stay as ordinary cache, since other sequences may share them.
    public func deleteSession(_ tenant: TenantID, name: String) throws(StoreError) {
        try catalog.delete(SessionID(tenant: tenant, name: name))
    }

    /// Deletes sessions whose TTL ran out; returns how many.
    @discardableResult
    public func expireSessions() -> Int {
        let expired = catalog.expire(now: Clocks.wallMicros())
        if !expired.isEmpty {
            state.withLock { $0.counters.sessionsExpired += expired.count }
            logger.info("sessions expired", metadata: ["count": "\(expired.count)"])
        }
        return expired.count
    }

    // MARK: internals

    /// The session, unless it does not exist or its TTL ran out (then it is deleted now).
    private func liveSession(_ id: SessionID) throws(StoreError) -> Session {
        guard let session = catalog.session(id) else { throw SessionCatalog.missing(id) }
        guard !session.isExpired(atWallMicros: Clocks.wallMicros()) else {
            expireSessions()
            throw SessionCatalog.missing(id)
        }
        return session
    }

    private func detail(_ session: Session) throws(StoreError) -> SessionDetail {
        let model = try model(session.modelID)
        var detail = SessionDetail(session: session, ramTokens: 0, diskTokens: 0)
        for page in locate(session.tenant, model, session.tokens) {
            switch page.tier {
            case .ram: detail.ramTokens += page.tokens.count
            case .disk, .remote: detail.diskTokens += page.tokens.count
            }
        }
        return detail
    }

    // MARK: prefetch

    /// Starts loading the disk pages of `tokens`' cached prefix into RAM without leasing them,
    /// hottest first (heat they had when evicted, plus attention reported since), then in
    /// sequence order; stops after `budgetBytes`. Returns the task (its value: pages loaded),
    /// or nil when nothing is on disk only.
    func prefetch(_ tenant: TenantID, model: ModelSpec, tokens: [UInt32], budgetBytes: Int) -> Task<Int, Never>? {
        let pages = locate(tenant, model, tokens).filter { $0.tier == .disk }
        guard !pages.isEmpty else { return nil }
        let heat = state.withLock { s in pages.map { s.evictedHeat[$0.address] ?? 0 } }
        var order = pages.indices.sorted { heat[$0] != heat[$1] ? heat[$0] > heat[$1] : $0 < $1 }
        var bytes = 0
        order = Array(order.prefix { index in
            bytes += pages[index].tokens.count * model.bytesPerToken
            return bytes <= budgetBytes
        })
        return prefetch(tenant, model: model, addresses: order.map { pages[$0].address })
    }

    /// Starts loading `addresses` (disk pages, in the order given) into RAM without leasing them;
    /// pages in RAM or being loaded already are skipped, the others count as issued. Returns
    /// the task (its value: pages loaded), or nil when there is nothing to load.
    func prefetch(_ tenant: TenantID, model: ModelSpec, addresses wanted: [PageAddress]) -> Task<Int, Never>? {
        guard let memory = try? memory(for: tenant) else { return nil }
        let addresses = state.withLock { s in
            let missing = wanted.filter { s.resident[$0] == nil && s.loading[$0] == nil }
            s.counters.prefetchIssued += missing.count
            return missing
        }
        guard !addresses.isEmpty else { return nil }
        return Task {
            // Batches of a few pages: a GET that comes meanwhile waits only for the batch
            // holding its page, and reads the pages not started yet itself.
            var loaded = 0
            for start in stride(from: 0, to: addresses.count, by: Self.prefetchBatchPages) {
                loaded += await load(Array(addresses[start..<min(start + Self.prefetchBatchPages, addresses.count)]), model, memory, prefetch: true)
            }
            await makeRoom()
            return loaded
        }
    }

    /// Pages one prefetch read batch holds.
    static var prefetchBatchPages: Int { 16 }
}
