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
        /// Journal bytes a rewrite would take, roughly: when the file is much larger, rewrite.
        var liveBytes = 0
    }

    struct PageHold {
        var sessions = 0
        var pinned = 0
    }

    struct Holds {
        var pages: [PageAddress: PageHold] = [:]
        /// Bytes of pages held by pinned sessions (each page counted once).
        var pinnedBytes = 0
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
        for session in snapshot.sessions.values {
            guard let model = snapshot.models[session.modelID] else {
                logger.warning("catalog session names an unknown model; forgetting it", metadata: ["session": "\(session.id)"])
                continue
            }
            initial.sessions[session.id] = Entry(session: session, pages: Self.pages(of: session, model))
            initial.perTenant[session.tenant, default: 0] += 1
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
        try state.withLock { s throws(StoreError) in
            guard s.models[model.id] != model else { return }
            try Self.journal(&s, [.model(model)], sync: false)
            s.models[model.id] = model
        }
    }

    // MARK: reading

    public var count: Int { state.withLock { $0.sessions.count } }

    public func session(_ id: SessionID) -> Session? {
        state.withLock { $0.sessions[id]?.session }
    }

    public func sessions(of tenant: TenantID) -> [Session] {
        state.withLock { s in s.sessions.values.filter { $0.session.tenant == tenant }.map(\.session) }
    }

    /// How strongly sessions hold `address`.
    public func hold(on address: PageAddress) -> Hold {
        holds.withLock { h in
            guard let hold = h.pages[address] else { return .none }
            return hold.pinned > 0 ? .pinned : .session
        }
    }

    public var pinnedBytes: Int { holds.withLock { $0.pinnedBytes } }

    /// Bytes `id`'s pages would add to the pinned bytes if it were pinned.
    public func unpinnedBytes(of id: SessionID) -> Int {
        state.withLock { s in
            guard let entry = s.sessions[id], !entry.session.pinned else { return 0 }
            return holds.withLock { h in entry.pages.reduce(0) { $0 + ((h.pages[$1.address]?.pinned ?? 0) == 0 ? $1.bytes : 0) } }
        }
    }

    // MARK: changes

    /// Sets session `id` to `tokens` of `model` (creating it, extending it, or replacing a
    /// different sequence), durably. Returns the session's pages that no session holds anymore.
    @discardableResult
    public func store(_ id: SessionID, model: ModelSpec, tokens: [UInt32], now: UInt64) throws(StoreError) -> [PageAddress] {
        try Session.validate(name: id.name)
        return try state.withLock { s throws(StoreError) -> [PageAddress] in
            if s.models[model.id] == nil {
                try Self.journal(&s, [.model(model)], sync: false)
                s.models[model.id] = model
            }
            var session: Session
            let entry: CatalogEntry
            if let existing = s.sessions[id]?.session {
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
                guard s.perTenant[id.tenant, default: 0] < Session.maxPerTenant else {
                    throw .overBudget("this tenant holds \(Session.maxPerTenant) sessions, the most allowed: delete some first")
                }
                session = Session(tenant: id.tenant, name: id.name, modelID: model.id, tokens: tokens, lastUsedMicros: now)
                entry = .session(session)
            }
            try Self.journal(&s, [entry], sync: true)
            return replace(&s, id, with: Entry(session: session, pages: Self.pages(of: session, model)))
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
            try Self.journal(&s, [.settings(id, pinned: entry.session.pinned, ttlSeconds: entry.session.ttlSeconds, lastUsedMicros: now)], sync: false)
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
            guard s.perTenant[to.tenant, default: 0] < Session.maxPerTenant else {
                throw .overBudget("this tenant holds \(Session.maxPerTenant) sessions, the most allowed: delete some first")
            }
            var session = source.session
            session.name = to.name
            session.pinned = false
            session.lastUsedMicros = now
            try Self.journal(&s, [.session(session)], sync: true)
            _ = replace(&s, to, with: Entry(session: session, pages: source.pages))
            return session
        }
    }

    /// Forgets `id`. Its pages stay as ordinary cache (other sequences may share them).
    public func delete(_ id: SessionID) throws(StoreError) {
        try state.withLock { s throws(StoreError) in
            guard s.sessions[id] != nil else { throw Self.missing(id) }
            try Self.journal(&s, [.delete(id)], sync: true)
            _ = replace(&s, id, with: nil)
        }
    }

    /// Deletes every session whose TTL ran out by wall-clock `now`; returns their ids.
    public func expire(now: UInt64) -> [SessionID] {
        state.withLock { s in
            let expired = s.sessions.values.filter { $0.session.isExpired(atWallMicros: now) }.map(\.session.id)
            guard !expired.isEmpty else { return [] }
            do {
                try Self.journal(&s, expired.map { .delete($0) }, sync: true)
            } catch {
                logger.warning("cannot journal expired sessions; keeping them until the next try", metadata: ["error": "\(error)"])
                return []
            }
            for id in expired { _ = replace(&s, id, with: nil) }
            return expired
        }
    }

    // MARK: internals

    private func change(_ id: SessionID, now: UInt64, _ edit: (inout Session) -> Void) throws(StoreError) {
        try state.withLock { s throws(StoreError) in
            guard var entry = s.sessions[id] else { throw Self.missing(id) }
            edit(&entry.session)
            entry.session.lastUsedMicros = now
            let session = entry.session
            try Self.journal(&s, [.settings(id, pinned: session.pinned, ttlSeconds: session.ttlSeconds, lastUsedMicros: now)], sync: true)
            _ = replace(&s, id, with: entry)
        }
    }

    /// Swaps `id`'s entry (nil: removes it), moving page holds; returns pages no session holds now.
    private func replace(_ s: inout State, _ id: SessionID, with entry: Entry?) -> [PageAddress] {
        let old = s.sessions[id]
        if let old { s.liveBytes -= Self.recordBytes(old.session) } else if entry != nil { s.perTenant[id.tenant, default: 0] += 1 }
        if let entry { s.liveBytes += Self.recordBytes(entry.session) } else if old != nil { s.perTenant[id.tenant, default: 0] -= 1 }
        s.sessions[id] = entry
        return holds.withLock { h in
            if let entry { Self.hold(entry, by: 1, in: &h) }
            guard let old else { return [] }
            Self.hold(old, by: -1, in: &h)
            return old.pages.map(\.address).filter { h.pages[$0] == nil }
        }
    }

    private static func hold(_ entry: Entry, by delta: Int, in h: inout Holds) {
        for (address, bytes) in entry.pages {
            var hold = h.pages[address] ?? PageHold()
            let wasPinned = hold.pinned > 0
            hold.sessions += delta
            if entry.session.pinned { hold.pinned += delta }
            if wasPinned != (hold.pinned > 0) { h.pinnedBytes += hold.pinned > 0 ? bytes : -bytes }
            h.pages[address] = hold.sessions > 0 ? hold : nil
        }
    }

    private static func journal(_ s: inout State, _ entries: [CatalogEntry], sync: Bool) throws(StoreError) {
        guard let journal = s.journal else { return }
        do {
            try journal.append(entries, sync: sync)
            let modelBytes = s.models.count * 64
            if journal.size > 1 << 20, journal.size > 4 * (s.liveBytes + modelBytes) {
                var snapshot = CatalogSnapshot(models: s.models)
                for (id, entry) in s.sessions { snapshot.sessions[id] = entry.session }
                // Callers apply their entries to `s` after this returns: the rewrite must
                // already describe the state after them.
                for entry in entries { _ = snapshot.apply(entry) }
                try journal.rewrite(snapshot)
            }
        } catch {
            throw .unavailable("cannot write the session catalog: \(error)")
        }
    }

    static func missing(_ id: SessionID) -> StoreError {
        .notFound("session '\(id.name)' (deleted, expired, or never created by a put with this name): list sessions to see the names")
    }

    static func recordBytes(_ session: Session) -> Int { 40 + session.name.utf8.count + 4 * session.tokens.count }

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
