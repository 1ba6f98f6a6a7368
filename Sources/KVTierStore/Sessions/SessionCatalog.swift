import KVTierCodec
import KVTierCore
import Logging
import Synchronization

/// The registered models and every tenant's named sessions, kept in memory and in the catalog
/// journal (when the store has a disk), plus which pages sessions hold: pages of a session are
/// kept when a longer put supersedes them, pinned ones stay in RAM and on disk.
///
/// Locking: `state` may be held across a journal write; `holds` is a leaf lock (nothing is
/// called while it is held), so the disk tier and the RAM tier may consult it under their own
/// locks.
public final class SessionCatalog: Sendable {
    /// How strongly sessions hold a page.
    public enum Hold: Comparable, Sendable {
        case none
        /// Some session's sequence runs through it.
        case session
        /// A pinned session's sequence runs through it.
        case pinned
    }

    struct Entry {
        var session: Session
        /// The session's pages (whole pages, then the shorter last page) and their bytes.
        var pages: [(address: PageAddress, bytes: Int)]
    }

    struct State {
        var journal: CatalogJournal?
        var models: [UInt64: ModelSpec] = [:]
        var sessions: [SessionID: Entry] = [:]
        var perTenant: [TenantID: Int] = [:]
        var tokensPerTenant: [TenantID: Int] = [:]
        /// Each tenant's sessions, so listing one tenant's never walks every tenant's.
        var byTenant: [TenantID: Set<SessionID>] = [:]
        /// The models each tenant registered since the daemon started (in memory only: a
        /// tenant sees these and the models of its sessions; `models(of:)`).
        var registrations: [TenantID: Set<UInt64>] = [:]
        /// Journal bytes a rewrite would take, roughly (models and sessions): when the file is
        /// much larger, rewrite.
        var liveBytes = 0
        /// The journal's size after its last rewrite (or at open): a rewrite waits until the
        /// file has at least doubled since, so whatever the estimate above says, appends cost
        /// O(1) amortized and never rewrite the whole catalog each time.
        var compactedBytes = 0
        /// Rewrites since the catalog was opened.
        var compactions = 0
    }

    struct PageHold {
        var sessions = 0
        var pinned = 0
    }

    struct Holds {
        var pages: [PageAddress: PageHold] = [:]
        /// Bytes of pages held by pinned sessions (each page counted once).
        var pinnedBytes = 0
        /// The same per tenant (pages are per tenant, so each counts for its own).
        var pinnedBytesByTenant: [TenantID: Int] = [:]
        /// Pages the store is dropping now (`beginDrop`): no session may take a hold on them.
        var dropping: Set<PageAddress> = []
    }

    let logger: Logger
    let state: Mutex<State>
    let holds: Mutex<Holds>

    /// A catalog kept in `storage`'s catalog journal, replayed now.
    public convenience init(storage: any Storage, logger: Logger) throws(StorageError) {
        let (journal, snapshot) = try CatalogJournal.open(storage: storage, logger: logger)
        self.init(journal: journal, snapshot: snapshot, logger: logger)
    }

    /// A catalog kept in memory only: gone when the process ends.
    public convenience init(logger: Logger) {
        self.init(journal: nil, snapshot: CatalogSnapshot(), logger: logger)
    }

    private init(journal: sending CatalogJournal?, snapshot: CatalogSnapshot, logger: Logger) {
        self.logger = logger
        var initial = State(journal: journal, models: snapshot.models)
        initial.compactedBytes = journal?.size ?? 0
        for model in snapshot.models.values { initial.liveBytes += Self.recordBytes(model) }
        for session in snapshot.sessions.values {
            guard let model = snapshot.models[session.modelID] else {
                logger.warning("catalog session names an unknown model; forgetting it", metadata: ["session": "\(session.id)"])
                continue
            }
            initial.sessions[session.id] = Entry(session: session, pages: Self.pages(of: session, model))
            initial.perTenant[session.tenant, default: 0] += 1
            initial.tokensPerTenant[session.tenant, default: 0] += session.tokens.count
            initial.byTenant[session.tenant, default: []].insert(session.id)
            initial.liveBytes += Self.recordBytes(session)
        }
        var holds = Holds()
        for entry in initial.sessions.values { Self.hold(entry, by: 1, in: &holds) }
        self.state = Mutex(initial)
        self.holds = Mutex(holds)
    }

    // MARK: models

    public var models: [ModelSpec] { state.withLock { Array($0.models.values) } }

    /// Records a model's shape (journaled once per model; made durable with the next session change).
    public func record(_ model: ModelSpec) throws(StoreError) {
        try state.withLock { s throws(StoreError) in try Self.record(model, in: &s, self) }
    }

    /// Records `model` as registered by `tenant`, which may have registered at most
    /// `maxModelsPerTenant` models since the daemon started (registering one again is free).
    public func register(_ model: ModelSpec, for tenant: TenantID, maxModelsPerTenant: Int) throws(StoreError) {
        try state.withLock { s throws(StoreError) in
            let registered = s.registrations[tenant] ?? []
            if !registered.contains(model.id) {
                guard registered.count < maxModelsPerTenant else {
                    throw .overBudget("this tenant registered \(registered.count) models, the most allowed (maxModelsPerTenant \(maxModelsPerTenant)): reuse the models you have, or ask the operator to raise maxModelsPerTenant")
                }
            }
            try Self.record(model, in: &s, self)
            s.registrations[tenant, default: []].insert(model.id)
        }
    }

    private static func record(_ model: ModelSpec, in s: inout State, _ catalog: SessionCatalog) throws(StoreError) {
        guard s.models[model.id] != model else { return }
        try catalog.journal(&s, [.model(model)], sync: false)
        if let old = s.models[model.id] { s.liveBytes -= recordBytes(old) }
        s.liveBytes += recordBytes(model)
        s.models[model.id] = model
    }

    /// The models `tenant` may see: those it registered since the daemon started, and those
    /// its sessions use. Other tenants' model names are theirs alone.
    public func models(of tenant: TenantID) -> [ModelSpec] {
        state.withLock { s in
            var ids = s.registrations[tenant] ?? []
            for id in s.byTenant[tenant] ?? [] {
                if let session = s.sessions[id]?.session { ids.insert(session.modelID) }
            }
            return ids.compactMap { s.models[$0] }
        }
    }

    /// Journal rewrites since the catalog was opened (compaction).
    public var compactions: Int { state.withLock { $0.compactions } }

    // MARK: reading

    public var count: Int { state.withLock { $0.sessions.count } }

    public func session(_ id: SessionID) -> Session? {
        state.withLock { $0.sessions[id]?.session }
    }

    /// The tenant's sessions, in no order: O(the tenant's sessions) under the lock, never
    /// O(their tokens) (a session's tokens are shared, not copied).
    public func sessions(of tenant: TenantID) -> [Session] {
        state.withLock { s in (s.byTenant[tenant] ?? []).compactMap { s.sessions[$0]?.session } }
    }

    /// How strongly sessions hold `address`.
    public func hold(on address: PageAddress) -> Hold {
        holds.withLock { h in
            guard let hold = h.pages[address] else { return .none }
            return hold.pinned > 0 ? .pinned : .session
        }
    }

    public var pinnedBytes: Int { holds.withLock { $0.pinnedBytes } }

    /// Bytes of `tenant`'s pages held by its pinned sessions.
    public func pinnedBytes(of tenant: TenantID) -> Int { holds.withLock { $0.pinnedBytesByTenant[tenant] ?? 0 } }

    /// Bytes `id`'s pages would add to the pinned bytes if it were pinned.
    public func unpinnedBytes(of id: SessionID) -> Int {
        state.withLock { s in
            guard let entry = s.sessions[id], !entry.session.pinned else { return 0 }
            return holds.withLock { h in entry.pages.reduce(0) { $0 + ((h.pages[$1.address]?.pinned ?? 0) == 0 ? $1.bytes : 0) } }
        }
    }

    // MARK: changes

    /// Sets session `id` to `tokens` of `model` (creating it, extending it, or replacing a
    /// different sequence), durably. Returns the session as it was before (nil: it is new), for
    /// `revert`.
    @discardableResult
    public func store(_ id: SessionID, model: ModelSpec, tokens: [UInt32], now: UInt64) throws(StoreError) -> Session? {
        try Session.validate(name: id.name)
        return try state.withLock { s throws(StoreError) -> Session? in
            if s.models[model.id] == nil { try Self.record(model, in: &s, self) }
            let previous = s.sessions[id]?.session
            var session: Session
            let entry: CatalogEntry
            if let existing = previous {
                guard existing.modelID == model.id else {
                    throw .invalidArgument("session '\(id.name)' holds model 0x\(String(existing.modelID, radix: 16)), not 0x\(String(model.id, radix: 16)): use another name, or delete it first")
                }
                session = existing
                let keep = Self.commonPrefix(existing.tokens, tokens)
                session.tokens = tokens
                session.lastUsedMicros = now
                entry = keep == existing.tokens.count || keep * 2 >= tokens.count
                    ? .extend(id, keep: keep, appended: Array(tokens[keep...]), lastUsedMicros: now)
                    : .session(session)
            } else {
                session = Session(tenant: id.tenant, name: id.name, modelID: model.id, tokens: tokens, lastUsedMicros: now)
                entry = .session(session)
            }
            try commit(&s, id, to: Entry(session: session, pages: Self.pages(of: session, model)), journaling: [entry])
            return previous
        }
    }

    /// Undoes a `store` whose pages turned out to be gone: the session as it was before, or no
    /// session when it was new.
    public func revert(_ id: SessionID, to previous: Session?) throws(StoreError) {
        try state.withLock { s throws(StoreError) in
            if let previous, let model = s.models[previous.modelID] {
                try commit(&s, id, to: Entry(session: previous, pages: Self.pages(of: previous, model)), journaling: [.session(previous)])
            } else if s.sessions[id] != nil {
                try commit(&s, id, to: nil, journaling: [.delete(id)])
            }
        }
    }

    /// Pins or unpins `id`.
    public func setPinned(_ id: SessionID, _ pinned: Bool, now: UInt64) throws(StoreError) {
        try change(id, now: now) { $0.pinned = pinned }
    }

    public func setTTL(_ id: SessionID, seconds: UInt32, now: UInt64) throws(StoreError) {
        try change(id, now: now) { $0.ttlSeconds = seconds }
    }

    /// Marks `id` used now (its TTL counts from here). Journaled without waiting for the disk:
    /// a crash may forget the last touch, which only makes the TTL count from an earlier use.
    public func touch(_ id: SessionID, now: UInt64) throws(StoreError) -> Session {
        try state.withLock { s throws(StoreError) -> Session in
            guard var entry = s.sessions[id] else { throw Self.missing(id) }
            entry.session.lastUsedMicros = now
            try journal(&s, [.settings(id, pinned: entry.session.pinned, ttlSeconds: entry.session.ttlSeconds, lastUsedMicros: now)], sync: false)
            s.sessions[id] = entry
            return entry.session
        }
    }

    /// A new session `to` with `from`'s tokens: it shares every page until one of them is
    /// extended differently (pages are content-addressed, so that is copy-on-write). The fork
    /// starts unpinned, with `from`'s TTL.
    public func fork(_ from: SessionID, to: SessionID, now: UInt64) throws(StoreError) -> Session {
        try Session.validate(name: to.name)
        return try state.withLock { s throws(StoreError) -> Session in
            guard let source = s.sessions[from] else { throw Self.missing(from) }
            guard s.sessions[to] == nil else { throw .invalidArgument("session '\(to.name)' exists already: delete it first or fork to another name") }
            var session = source.session
            session.name = to.name
            session.pinned = false
            session.lastUsedMicros = now
            try commit(&s, to, to: Entry(session: session, pages: source.pages), journaling: [.session(session)])
            return session
        }
    }

    /// Forgets `id`. Its pages stay as ordinary cache (other sequences may share them).
    public func delete(_ id: SessionID) throws(StoreError) {
        try state.withLock { s throws(StoreError) in
            guard s.sessions[id] != nil else { throw Self.missing(id) }
            try commit(&s, id, to: nil, journaling: [.delete(id)])
        }
    }

    /// Deletes every session whose TTL ran out by wall-clock `now`; returns their ids.
    public func expire(now: UInt64) -> [SessionID] {
        state.withLock { s in
            let expired = s.sessions.values.filter { $0.session.isExpired(atWallMicros: now) }.map(\.session.id)
            var deleted: [SessionID] = []
            for id in expired {
                do {
                    try commit(&s, id, to: nil, journaling: [.delete(id)])
                    deleted.append(id)
                } catch {
                    logger.warning("cannot journal an expired session; keeping it until the next try", metadata: ["error": "\(error)"])
                    break
                }
            }
            return deleted
        }
    }

    // MARK: dropping pages

    /// Whether the store may drop `address` (a superseded page) now: no session holds it. Until
    /// `endDrop`, no session may take a hold on it (`store` and `fork` refuse, asking to retry),
    /// so a page a session names is never dropped underneath it.
    public func beginDrop(_ address: PageAddress) -> Bool {
        holds.withLock { h in
            guard h.pages[address] == nil, !h.dropping.contains(address) else { return false }
            h.dropping.insert(address)
            return true
        }
    }

    public func endDrop(_ address: PageAddress) {
        _ = holds.withLock { $0.dropping.remove(address) }
    }

    // MARK: internals

    private func change(_ id: SessionID, now: UInt64, _ edit: (inout Session) -> Void) throws(StoreError) {
        try state.withLock { s throws(StoreError) in
            guard var entry = s.sessions[id] else { throw Self.missing(id) }
            edit(&entry.session)
            entry.session.lastUsedMicros = now
            let session = entry.session
            try commit(&s, id, to: entry, journaling: [.settings(id, pinned: session.pinned, ttlSeconds: session.ttlSeconds, lastUsedMicros: now)])
        }
    }

    /// Journals `entries` (synced) and makes `entry` (nil: none) `id`'s session. The new entry's
    /// holds are taken before the journal write, refusing pages being dropped; the old entry's
    /// are given back after it. Limits per tenant are checked first.
    private func commit(_ s: inout State, _ id: SessionID, to entry: Entry?, journaling entries: [CatalogEntry]) throws(StoreError) {
        let old = s.sessions[id]
        if let entry {
            if old == nil, s.perTenant[id.tenant, default: 0] >= Session.maxPerTenant {
                throw .overBudget("this tenant holds \(Session.maxPerTenant) sessions, the most allowed: delete some first")
            }
            let tokens = s.tokensPerTenant[id.tenant, default: 0] - (old?.session.tokens.count ?? 0) + entry.session.tokens.count
            guard tokens <= Session.maxTokensPerTenant else {
                throw .overBudget("this tenant's sessions would hold \(tokens) tokens, over the \(Session.maxTokensPerTenant) allowed: delete or shorten some first")
            }
            let busy = holds.withLock { h -> Bool in
                guard !entry.pages.contains(where: { h.dropping.contains($0.address) }) else { return true }
                Self.hold(entry, by: 1, in: &h)
                return false
            }
            guard !busy else {
                throw .invalidArgument("a page of session '\(id.name)' is being replaced by another put right now: put again")
            }
        }
        do {
            try journal(&s, entries, sync: true)
        } catch {
            if let entry { holds.withLock { Self.hold(entry, by: -1, in: &$0) } }
            throw error
        }
        if let old {
            s.liveBytes -= Self.recordBytes(old.session)
            s.tokensPerTenant[id.tenant, default: 0] -= old.session.tokens.count
            if entry == nil { s.perTenant[id.tenant, default: 0] -= 1 }
            holds.withLock { Self.hold(old, by: -1, in: &$0) }
        } else if entry != nil {
            s.perTenant[id.tenant, default: 0] += 1
        }
        if let entry {
            s.liveBytes += Self.recordBytes(entry.session)
            s.tokensPerTenant[id.tenant, default: 0] += entry.session.tokens.count
        }
        s.sessions[id] = entry
        if entry != nil {
            s.byTenant[id.tenant, default: []].insert(id)
        } else {
            s.byTenant[id.tenant]?.remove(id)
            if s.byTenant[id.tenant]?.isEmpty == true { s.byTenant[id.tenant] = nil }
        }
    }

    private static func hold(_ entry: Entry, by delta: Int, in h: inout Holds) {
        for (address, bytes) in entry.pages {
            var hold = h.pages[address] ?? PageHold()
            let wasPinned = hold.pinned > 0
            hold.sessions += delta
            if entry.session.pinned { hold.pinned += delta }
            if wasPinned != (hold.pinned > 0) {
                let change = hold.pinned > 0 ? bytes : -bytes
                h.pinnedBytes += change
                let left = (h.pinnedBytesByTenant[address.tenant] ?? 0) + change
                h.pinnedBytesByTenant[address.tenant] = left > 0 ? left : nil
            }
            h.pages[address] = hold.sessions > 0 ? hold : nil
        }
    }

    /// Appends `entries`. A failed append leaves the journal as it was (the caller then leaves
    /// memory as it was too); a failed compaction after a good append only logs.
    private func journal(_ s: inout State, _ entries: [CatalogEntry], sync: Bool) throws(StoreError) {
        guard let journal = s.journal else { return }
        do {
            try journal.append(entries, sync: sync)
        } catch {
            throw .unavailable("cannot write the session catalog: \(error)")
        }
        guard journal.size > 1 << 20, journal.size > 4 * s.liveBytes, journal.size > 2 * s.compactedBytes else { return }
        var snapshot = CatalogSnapshot(models: s.models)
        for (id, entry) in s.sessions { snapshot.sessions[id] = entry.session }
        // Callers apply their entries to `s` after this returns: the rewrite must already
        // describe the state after them.
        for entry in entries { _ = snapshot.apply(entry) }
        do {
            try journal.rewrite(snapshot)
            s.compactedBytes = journal.size
            s.compactions += 1
        } catch {
            // Counted as a rewrite for the pacing above: a failing disk is not retried on
            // every append either.
            s.compactedBytes = journal.size
            logger.warning("cannot compact the session catalog; it keeps growing until the next try", metadata: ["error": "\(error)"])
        }
    }

    static func missing(_ id: SessionID) -> StoreError {
        .notFound("no session '\(id.name)' (deleted, expired, or never created by a put with this name): list sessions to see the names")
    }

    /// Bytes of a session's and a model's record in the journal (docs/format.md).
    static func recordBytes(_ session: Session) -> Int { 44 + session.name.utf8.count + 4 * session.tokens.count }
    static func recordBytes(_ model: ModelSpec) -> Int { 34 + model.name.utf8.count + (model.diskCodec.map { 2 + $0.name.utf8.count } ?? 0) }

    static func commonPrefix(_ a: [UInt32], _ b: [UInt32]) -> Int {
        var n = 0
        let limit = min(a.count, b.count)
        while n < limit, a[n] == b[n] { n += 1 }
        return n
    }

    /// The pages a session's tokens run through, with their sizes.
    static func pages(of session: Session, _ model: ModelSpec) -> [(address: PageAddress, bytes: Int)] {
        let keys = PageKeyChain.keys(modelID: model.id, tokens: session.tokens, pageTokens: model.pageTokens)
        return keys.enumerated().map { index, key in
            let tokens = min(model.pageTokens, session.tokens.count - index * model.pageTokens)
            return (PageAddress(tenant: session.tenant, key: key), tokens * model.bytesPerToken)
        }
    }
}
