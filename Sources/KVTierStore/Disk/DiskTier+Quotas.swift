import KVTierCore
import Logging

/// The disk budget and per-tenant disk quotas (docs/configuration.md, `diskBudget` and
/// `diskTenantQuota`): what a tenant's writes may delete, and when a write is refused instead.
///
/// A tenant over its quota gives back its own pages. Over the budget, the tenants that just wrote
/// give back their own pages first, then tenants above their fair share (budget ÷ tenants with
/// pages) give back pages no session holds. Another tenant's session pages, and any pinned
/// session's, are never deleted to make room. A page write that could not fit even after every
/// allowed deletion is refused (`DiskTierError.overBudget`), so it fails its put cleanly.
/// The session-hold lookup, boxed in a struct: a bare closure kept in a `Mutex` (generic storage)
/// is re-wrapped in a reabstraction thunk each time `withLock` hands it out and writes it back, so
/// every read made the next call one frame deeper. After a few thousand group commits under a disk
/// budget each hold lookup walked thousands of thunks, with the disk tier's lock held, and every
/// request stalled behind it (and the stack would have overflowed in the end).
struct SessionHolds: Sendable {
    let hold: @Sendable (PageAddress) -> SessionCatalog.Hold
}

extension DiskTier {
    struct Candidate {
        var address: PageAddress
        var bytes: Int
        var hold: SessionCatalog.Hold
        var lastAccessMicros: UInt64
    }

    /// Block-padded live bytes per tenant.
    static func tenantUsage(_ s: State) -> [TenantID: Int] {
        var usage: [TenantID: Int] = [:]
        for (address, location) in s.index { usage[address.tenant, default: 0] += Block.roundUp(location.recordBytes) }
        return usage
    }

    static func candidates(_ s: State, _ holds: SessionHolds?) -> [Candidate] {
        s.index.compactMap { address, location in
            let hold = holds?.hold(address) ?? .none
            guard hold != .pinned else { return nil }
            return Candidate(address: address, bytes: Block.roundUp(location.recordBytes), hold: hold,
                             lastAccessMicros: location.lastAccessMicros)
        }
    }

    /// Which page records of `group` must be refused: index in the group, and why. Runs only
    /// when a limit would be crossed, so a store within its limits pays nothing.
    func refusals(_ group: [PendingWrite]) -> [Int: DiskTierError] {
        let budget = configuration.budgetBytes
        let quota = configuration.tenantBudgetBytes
        guard budget != nil || quota != nil else { return [:] }
        var incoming: [(index: Int, tenant: TenantID, bytes: Int)] = []
        for (i, item) in group.enumerated() {
            if case .page(let record) = item.body { incoming.append((i, item.address.tenant, Block.roundUp(record.count))) }
        }
        guard !incoming.isEmpty else { return [:] }
        let holds = sessionHolds()
        return state.withLock { s -> [Int: DiskTierError] in
            var live = s.segments.values.reduce(0) { $0 + $1.liveBytes }
            let adding = incoming.reduce(0) { $0 + $1.bytes }
            var usage: [TenantID: Int]? = nil
            if let quota {
                usage = Self.tenantUsage(s)
                if !incoming.contains(where: { usage![$0.tenant, default: 0] + $0.bytes > quota }) && budget.map({ live + adding <= $0 }) ?? true {
                    return [:]
                }
            } else if let budget, live + adding <= budget {
                return [:]
            }
            if usage == nil { usage = Self.tenantUsage(s) }
            var tenantBytes = usage!
            let candidates = Self.candidates(s, holds)
            var ownFreeable: [TenantID: Int] = [:]
            var unheld: [TenantID: Int] = [:]
            for c in candidates {
                ownFreeable[c.address.tenant, default: 0] += c.bytes
                if c.hold == .none { unheld[c.address.tenant, default: 0] += c.bytes }
            }
            var refused: [Int: DiskTierError] = [:]
            for write in incoming {
                let tenant = write.tenant
                if let quota, tenantBytes[tenant, default: 0] + write.bytes > quota,
                   tenantBytes[tenant, default: 0] + write.bytes - quota > ownFreeable[tenant, default: 0] {
                    refused[write.index] = .overBudget(
                        "tenant \(tenant.rawValue) would hold \(ByteCount(tenantBytes[tenant, default: 0] + write.bytes)) on disk, over its "
                            + "disk quota of \(ByteCount(quota)) (diskTenantQuota), and only pinned sessions' pages are left to delete: "
                            + "unpin or delete sessions, or raise diskTenantQuota")
                    continue
                }
                if let budget, live + write.bytes > budget {
                    // What may go to make room for this tenant: its own pages, and the unheld pages
                    // of other tenants above their fair share.
                    let tenants = tenantBytes.filter { $0.value > 0 || $0.key == tenant }.count + (tenantBytes[tenant] == nil ? 1 : 0)
                    let fairShare = budget / max(1, tenants)
                    var freeable = ownFreeable[tenant, default: 0]
                    for (other, bytes) in unheld where other != tenant {
                        freeable += min(bytes, max(0, tenantBytes[other, default: 0] - fairShare))
                    }
                    if live + write.bytes - budget > freeable {
                        refused[write.index] = .overBudget(
                            "the disk budget of \(ByteCount(budget)) (diskBudget) is full and nothing this tenant may delete would make "
                                + "room: other tenants' session pages are never deleted for it; delete or unpin sessions, or raise diskBudget")
                        continue
                    }
                }
                live += write.bytes
                tenantBytes[tenant, default: 0] += write.bytes
            }
            return refused
        }
    }

    /// After each flush: deletes pages (with tombstones) of tenants over their quota, then, while
    /// live bytes exceed 90% of the budget, down to 80% by the rules above.
    func enforceBudget() {
        let budget = configuration.budgetBytes
        let quota = configuration.tenantBudgetBytes
        guard budget != nil || quota != nil else { return }
        let holds = sessionHolds()
        let (victims, shortfall) = state.withLock { s -> ([PageAddress], Bool) in
            let writers = s.recentWriters
            s.recentWriters.removeAll()
            var live = s.segments.values.reduce(0) { $0 + $1.liveBytes }
            let files = s.segments.values.reduce(0) { $0 + $1.fileBytes }
            let overBudget = budget.map { files > $0 || live > $0 * 9 / 10 } ?? false
            var usage = quota != nil || overBudget ? Self.tenantUsage(s) : [:]
            let overQuota = quota.map { q in usage.filter { $0.value > q }.map(\.key) } ?? []
            guard overBudget || !overQuota.isEmpty else { return ([], false) }
            // Least recently used first. A tenant's own pages go by age alone, whatever holds
            // them: its newest pages may be a session put still in flight, not yet in the catalog.
            let ranked = Self.candidates(s, holds).sorted { $0.lastAccessMicros < $1.lastAccessMicros }
            var chosen: [PageAddress] = []
            var taken = Set<PageAddress>()
            func take(_ c: Candidate) {
                chosen.append(c.address)
                taken.insert(c.address)
                usage[c.address.tenant, default: 0] -= c.bytes
                live -= c.bytes
            }
            if let quota {
                for tenant in overQuota {
                    for c in ranked where c.address.tenant == tenant {
                        guard usage[tenant, default: 0] > quota * 9 / 10 else { break }
                        take(c)
                    }
                }
            }
            guard let budget, files > budget || live > budget * 9 / 10 else { return (chosen, false) }
            let fairShare = budget / max(1, usage.filter { $0.value > 0 }.count)
            for c in ranked where writers.contains(c.address.tenant) && !taken.contains(c.address) {
                guard live > budget * 8 / 10 else { break }
                take(c)
            }
            for c in ranked where c.hold == .none && !taken.contains(c.address) {
                guard live > budget * 8 / 10 else { break }
                if usage[c.address.tenant, default: 0] > fairShare { take(c) }
            }
            return (chosen, live > budget * 8 / 10)
        }
        if shortfall {
            logger.warning("the disk budget stays over 80%: what is left belongs to sessions or to tenants within their fair share; new writes that do not fit are refused", metadata: ["budget": "\(budget ?? 0)"])
        }
        guard !victims.isEmpty else { return }
        let now = Clocks.wallMicros()
        let tombstones = victims.map { address in
            PendingWrite(address: address, body: .tombstone, createdMicros: now) { _ in }
        }
        state.withLock { $0.stats.evictions += victims.count }
        logger.info("disk budget or tenant quota exceeded; evicting pages", metadata: ["pages": "\(victims.count)"])
        copyRecordsLeaving(victims)
        commitInternal(tombstones)
    }
}
