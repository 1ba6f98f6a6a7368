#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import KVTierCore
import KVTierProtocol
import KVTierStore
import Synchronization

/// The VRAM tier's directory (docs/vram-tier.md): which page of the store is in which slot of
/// which pool, the leases on slots, and eviction by heat. Pools are memory of client processes
/// that the daemon never touches; it keeps their handles and hands them only to connections of
/// the tenant that registered them, so a tenant can poison only its own reads.
///
/// A slot is free, being written (reserved by a `VRAM_PLACE` lease, invisible to readers and
/// never evicted), or resident (visible; evictable while no `VRAM_LEASE` lease holds it). A page
/// is in a pool at most once. Everything is bounded: `TenantLimits.maxVramPoolsPerTenant` pools
/// per tenant, `ProtocolLimits.maxVramSlots` slots per pool (the wire checks it), and the lease
/// limits of `Limits`.
public final class VramDirectory: Sendable {
    public struct Limits: Sendable {
        public var maxPoolsPerTenant = TenantLimits.maxVramPoolsPerTenant
        /// Directory leases (`VRAM_PLACE` and `VRAM_LEASE`) of one connection, and of one tenant;
        /// counted apart from the store's leases, with the same defaults.
        public var maxLeasesPerConnection = TenantLimits.maxLeasesPerConnection
        public var maxLeasesPerTenant = TenantLimits.maxLeasesPerTenant
        public var maxLeasedSlotsPerTenant = TenantLimits.maxVramLeasedSlotsPerTenant
        public init() {}
    }

    /// One page of a cached prefix as the store located it (`TieredStore.PageRef`): pages come
    /// in order from page 0, so a page's index is its position.
    public struct Page: Sendable, Hashable {
        public var address: PageAddress
        public var tokens: Int

        public init(address: PageAddress, tokens: Int) {
            self.address = address
            self.tokens = tokens
        }
    }

    /// A pool as `VRAM_LEASE` describes it.
    public struct PoolInfo: Sendable, Equatable {
        public var id: UInt32
        public var deviceUUID: String
        public var slots: Int
        public var slotBytes: UInt64
        public var handle: [UInt8]
    }

    /// A slot reserved by `place`: page `pageIndex` of the prefix, `tokens` long, goes in `slot`.
    public struct Reservation: Sendable, Hashable {
        public var pageIndex: Int
        public var tokens: Int
        public var slot: Int
    }

    public struct Placement: Sendable, Equatable {
        /// 0 when nothing was reserved.
        public var leaseID: UInt64
        /// Leading tokens of the prefix resident in the pool before the call.
        public var residentTokens: Int
        public var reserved: [Reservation]
    }

    /// What `lease` lent: the pool, and the slots of the leading resident pages in page order.
    public struct Lent: Sendable, Equatable {
        public var pool: PoolInfo
        public var leaseID: UInt64
        public var tokens: Int
        /// (tokens, slot) of each page from page 0.
        public var pages: [(tokens: Int, slot: Int)]

        public static func == (a: Lent, b: Lent) -> Bool {
            a.pool == b.pool && a.leaseID == b.leaseID && a.tokens == b.tokens
                && a.pages.map(\.tokens) == b.pages.map(\.tokens) && a.pages.map(\.slot) == b.pages.map(\.slot)
        }
    }

    /// Lease ids start here, far above any the store hands out (its counter starts at 1), so a
    /// `RELEASE` id names one or the other.
    public static let firstLeaseID: UInt64 = 1 << 62

    struct Resident {
        var page: PageAddress
        var tokens: Int
        /// `VRAM_LEASE` leases holding the slot: while any does, it is neither evicted nor
        /// overwritten.
        var readers = 0
        /// Uses (the commit, then each lease), decayed by half every half-life up to `lastUseMicros`.
        var uses: Double
        var lastUseMicros: UInt64
    }

    enum Slot {
        case free
        case writing(lease: UInt64, page: Page)
        case resident(Resident)
    }

    struct Pool {
        var info: PoolInfo
        var tenant: TenantID
        /// The connection that registered it: the pool ends when it closes.
        var owner: UInt64
        var slots: [Slot]
        /// Free slot numbers; the last is taken first (initially slot 0).
        var free: [Int]
        /// The slot of each page being written or resident.
        var index: [PageAddress: Int] = [:]
        /// Every lease on the pool's slots, whatever its connection (dropped with the pool).
        var leases: Set<UInt64> = []
        var residentCount = 0
        var writingCount = 0
        /// `VRAM_DROP` was asked: no new request sees the pool; it is forgotten once no reader
        /// lease is left on it.
        var retired = false

        /// The slot holding `address` resident, if it is.
        func resident(_ address: PageAddress) -> (slot: Int, page: Resident)? {
            guard let slot = index[address], case .resident(let page) = slots[slot] else { return nil }
            return (slot, page)
        }

        /// How many leading `pages` are resident here.
        func residentRun(_ pages: [Page]) -> Int {
            var run = 0
            for page in pages {
                guard let held = resident(page.address), held.page.tokens == page.tokens else { break }
                run += 1
            }
            return run
        }

        mutating func setFree(_ slot: Int) {
            switch slots[slot] {
            case .free: return
            case .writing(_, let page):
                index[page.address] = nil
                writingCount -= 1
            case .resident(let page):
                index[page.page] = nil
                residentCount -= 1
            }
            slots[slot] = .free
            free.append(slot)
        }
    }

    struct Lease {
        enum Kind { case place, read }
        var kind: Kind
        var tenant: TenantID
        var owner: UInt64
        var pool: UInt32
        var slots: [Int]
    }

    struct Counters {
        var placements = 0, placedSlots = 0, commits = 0, evictions = 0, leaseHits = 0, leaseMisses = 0
    }

    struct State {
        var pools: [UInt32: Pool] = [:]
        /// Pool ids of each tenant and of each connection, oldest first.
        var poolsOfTenant: [TenantID: [UInt32]] = [:]
        var poolsOfOwner: [UInt64: [UInt32]] = [:]
        var leases: [UInt64: Lease] = [:]
        var leasesOfOwner: [UInt64: Set<UInt64>] = [:]
        var leaseCountOfTenant: [TenantID: Int] = [:]
        var leasedSlotsOfTenant: [TenantID: Int] = [:]
        var nextPoolID: UInt32 = 1
        var nextLeaseID = VramDirectory.firstLeaseID
        var counters = Counters()

        mutating func addLease(_ lease: Lease) -> UInt64 {
            let id = nextLeaseID
            nextLeaseID += 1
            leases[id] = lease
            leasesOfOwner[lease.owner, default: []].insert(id)
            leaseCountOfTenant[lease.tenant, default: 0] += 1
            if lease.kind == .read { leasedSlotsOfTenant[lease.tenant, default: 0] += lease.slots.count }
            pools[lease.pool]?.leases.insert(id)
            return id
        }

        /// Forgets a lease's record (its slots are the caller's business).
        mutating func removeLease(_ id: UInt64) -> Lease? {
            guard let lease = leases.removeValue(forKey: id) else { return nil }
            leasesOfOwner[lease.owner]?.remove(id)
            if leasesOfOwner[lease.owner]?.isEmpty == true { leasesOfOwner[lease.owner] = nil }
            Self.subtract(1, from: &leaseCountOfTenant, lease.tenant)
            if lease.kind == .read { Self.subtract(lease.slots.count, from: &leasedSlotsOfTenant, lease.tenant) }
            pools[lease.pool]?.leases.remove(id)
            return lease
        }

        /// Ends a lease: a placement's slots go back to free (nothing it reserved becomes
        /// resident), a reader's slots lose a reader.
        mutating func endLease(_ id: UInt64) {
            guard let lease = removeLease(id), var pool = pools[lease.pool] else { return }
            for slot in lease.slots {
                switch (lease.kind, pool.slots[slot]) {
                case (.place, .writing(let holder, _)) where holder == id:
                    pool.setFree(slot)
                case (.read, .resident(var page)):
                    page.readers -= 1
                    pool.slots[slot] = .resident(page)
                default:
                    break
                }
            }
            pools[lease.pool] = pool
        }

        /// Drops a pool, everything resident in it and every lease on it.
        mutating func dropPool(_ id: UInt32) {
            guard let pool = pools[id] else { return }
            for lease in pool.leases { _ = removeLease(lease) }
            pools[id] = nil
            poolsOfTenant[pool.tenant]?.removeAll { $0 == id }
            if poolsOfTenant[pool.tenant]?.isEmpty == true { poolsOfTenant[pool.tenant] = nil }
            poolsOfOwner[pool.owner]?.removeAll { $0 == id }
            if poolsOfOwner[pool.owner]?.isEmpty == true { poolsOfOwner[pool.owner] = nil }
        }

        /// The tenant's pool holding the longest resident run of `pages` from page 0 (the
        /// oldest pool among equals), and that run; nil when none holds page 0.
        func bestPool(_ tenant: TenantID, _ pages: [Page]) -> (id: UInt32, run: Int)? {
            guard !pages.isEmpty else { return nil }
            var best: (id: UInt32, run: Int)?
            for id in poolsOfTenant[tenant] ?? [] {
                guard let pool = pools[id] else { continue }
                let run = pool.residentRun(pages)
                if run > 0, run > (best?.run ?? 0) { best = (id, run) }
            }
            return best
        }

        /// Why one more lease of `owner` in `tenant` (naming `slots` slots, for a reader) would
        /// pass a limit, or nil.
        func refusal(tenant: TenantID, owner: UInt64, readerSlots: Int, _ limits: Limits) -> String? {
            if let held = leasesOfOwner[owner]?.count, held >= limits.maxLeasesPerConnection {
                return "this connection holds \(held) VRAM leases, the most one connection may (maxLeasesPerConnection \(limits.maxLeasesPerConnection)): RELEASE or VRAM_COMMIT the ones it is done with"
            }
            if let held = leaseCountOfTenant[tenant], held >= limits.maxLeasesPerTenant {
                return "this tenant's connections hold \(held) VRAM leases, the most one tenant may (maxLeasesPerTenant \(limits.maxLeasesPerTenant)): RELEASE the ones no longer read"
            }
            let leased = leasedSlotsOfTenant[tenant] ?? 0
            if readerSlots > 0, leased + readerSlots > limits.maxLeasedSlotsPerTenant {
                return "this tenant's VRAM leases name \(leased) slots and this one would add \(readerSlots), over the \(limits.maxLeasedSlotsPerTenant) allowed (maxVramLeasedSlotsPerTenant): RELEASE leases no longer read"
            }
            return nil
        }

        static func subtract(_ count: Int, from table: inout [TenantID: Int], _ tenant: TenantID) {
            let left = (table[tenant] ?? 0) - count
            table[tenant] = left > 0 ? left : nil
        }
    }

    let heatHalfLifeMicros: UInt64
    let limits: Limits
    let now: @Sendable () -> UInt64
    let state = Mutex(State())

    /// `now`: monotonic microseconds (tests pass a clock they move).
    public init(heatHalfLifeMicros: UInt64, limits: Limits = Limits(), now: @escaping @Sendable () -> UInt64 = Clocks.monotonicMicros) {
        self.heatHalfLifeMicros = max(1, heatHalfLifeMicros)
        self.limits = limits
        self.now = now
    }

    /// A slot's heat at `now`: its uses halved every half-life since the last.
    func heat(_ page: Resident, now: UInt64) -> Double {
        page.uses * exp2(-Double(now &- min(now, page.lastUseMicros)) / Double(heatHalfLifeMicros))
    }

    /// Counts a use of a resident slot.
    func use(_ page: inout Resident, now: UInt64) {
        page.uses = heat(page, now: now) + 1
        page.lastUseMicros = max(page.lastUseMicros, now)
    }

    // MARK: pools

    /// Registers a pool of `owner`'s (a connection) in `tenant`; returns its id, unique for the
    /// directory's life and never 0. The wire has checked the sizes; they are checked again for
    /// callers that do not come through it.
    public func registerPool(_ tenant: TenantID, owner: UInt64, deviceUUID: String, slots: Int, slotBytes: UInt64,
                             handle: [UInt8]) throws(StoreError) -> UInt32 {
        guard (1...ProtocolLimits.maxVramSlots).contains(slots), (1...ProtocolLimits.maxVramSlotBytes).contains(slotBytes),
              (1...ProtocolLimits.maxVramHandleBytes).contains(handle.count),
              (1...ProtocolLimits.maxDeviceUUIDBytes).contains(deviceUUID.utf8.count) else {
            throw .invalidArgument("a VRAM pool has 1 to \(ProtocolLimits.maxVramSlots) slots of 1 to \(ProtocolLimits.maxVramSlotBytes) bytes, a device UUID of 1 to \(ProtocolLimits.maxDeviceUUIDBytes) bytes and a handle of 1 to \(ProtocolLimits.maxVramHandleBytes) bytes")
        }
        let id = state.withLock { s -> Result<UInt32, StoreError> in
            // Retired pools count until they are forgotten: dropping cannot make room for more.
            let held = s.pools.values.reduce(0) { $0 + ($1.tenant == tenant ? 1 : 0) }
            guard held < limits.maxPoolsPerTenant else {
                return .failure(.overBudget("this tenant has \(held) VRAM pools, the most one may (maxVramPoolsPerTenant \(limits.maxPoolsPerTenant)): close the connection of a pool it no longer uses"))
            }
            guard s.nextPoolID != 0 else {
                return .failure(.overBudget("this kvtierd has handed out every VRAM pool id (2^32 - 1): restart it"))
            }
            let id = s.nextPoolID
            s.nextPoolID &+= 1
            let info = PoolInfo(id: id, deviceUUID: deviceUUID, slots: slots, slotBytes: slotBytes, handle: handle)
            s.pools[id] = Pool(info: info, tenant: tenant, owner: owner, slots: Array(repeating: .free, count: slots),
                               free: Array((0..<slots).reversed()))
            s.poolsOfTenant[tenant, default: []].append(id)
            s.poolsOfOwner[owner, default: []].append(id)
            return .success(id)
        }
        return try id.get()
    }

    /// Checks that `tenant` has pool `id` with slots of at least `pageBytes`.
    public func checkPool(_ tenant: TenantID, _ id: UInt32, pageBytes: Int) throws(StoreError) {
        let slotBytes = state.withLock { s in s.pools[id].flatMap { $0.tenant == tenant && !$0.retired ? $0.info.slotBytes : nil } }
        guard let slotBytes else { throw Self.noPool(id) }
        guard slotBytes >= UInt64(pageBytes) else {
            throw .invalidArgument("VRAM pool \(id) has slots of \(slotBytes) bytes; a page of this model takes \(pageBytes) (pageTokens × bytesPerToken): register a pool sized for the model")
        }
    }

    static func noPool(_ id: UInt32) -> StoreError {
        .notFound("no VRAM pool \(id) of this tenant (its connection closed, or it was never registered): register one with VRAM_POOL")
    }

    // MARK: residency

    /// Leading tokens of `pages` (a cached prefix, from page 0) resident in one pool of
    /// `tenant`: the pool holding the longest run from the first page.
    public func residentTokens(_ tenant: TenantID, _ pages: [Page]) -> Int {
        guard !pages.isEmpty else { return 0 }
        return state.withLock { s in
            guard let best = s.bestPool(tenant, pages) else { return 0 }
            return pages.prefix(best.run).reduce(0) { $0 + $1.tokens }
        }
    }

    /// Reserves slots of pool `poolID` for the pages of `pages` (a cached prefix) that it
    /// neither holds nor is being written, in order: free slots first, then slots of resident
    /// pages no lease holds, lowest heat first (oldest use among equals), never one of `pages`
    /// itself. When room runs out, the leading pages that fit are reserved (maybe none).
    public func place(_ tenant: TenantID, owner: UInt64, poolID: UInt32, pages: [Page], pageBytes: Int) throws(StoreError) -> Placement {
        let now = now()
        let result = state.withLock { s -> Result<Placement, StoreError> in
            guard var pool = s.pools[poolID], pool.tenant == tenant, !pool.retired else { return .failure(Self.noPool(poolID)) }
            guard pool.info.slotBytes >= UInt64(pageBytes) else {
                return .failure(.invalidArgument("VRAM pool \(poolID) has slots of \(pool.info.slotBytes) bytes; a page of this model takes \(pageBytes) (pageTokens × bytesPerToken): register a pool sized for the model"))
            }
            let residentTokens = pages.prefix(pool.residentRun(pages)).reduce(0) { $0 + $1.tokens }
            let missing = pages.indices.filter { pool.index[pages[$0].address] == nil }
            guard !missing.isEmpty else { return .success(Placement(leaseID: 0, residentTokens: residentTokens, reserved: [])) }
            if let refusal = s.refusal(tenant: tenant, owner: owner, readerSlots: 0, limits) { return .failure(.overBudget(refusal)) }

            if pool.free.count < missing.count {
                let keep = Set(pages.map(\.address))
                var victims: [(slot: Int, heat: Double, lastUse: UInt64)] = []
                for (slot, state) in pool.slots.enumerated() {
                    guard case .resident(let page) = state, page.readers == 0, !keep.contains(page.page) else { continue }
                    victims.append((slot, heat(page, now: now), page.lastUseMicros))
                }
                victims.sort { ($0.heat, $0.lastUse, $0.slot) < ($1.heat, $1.lastUse, $1.slot) }
                for victim in victims.prefix(missing.count - pool.free.count) {
                    pool.setFree(victim.slot)
                    s.counters.evictions += 1
                }
            }
            let id = s.nextLeaseID
            var reserved: [Reservation] = []
            for index in missing.prefix(pool.free.count) {
                let slot = pool.free.removeLast()
                pool.slots[slot] = .writing(lease: id, page: pages[index])
                pool.index[pages[index].address] = slot
                pool.writingCount += 1
                reserved.append(Reservation(pageIndex: index, tokens: pages[index].tokens, slot: slot))
            }
            s.pools[poolID] = pool
            s.counters.placements += 1
            guard !reserved.isEmpty else { return .success(Placement(leaseID: 0, residentTokens: residentTokens, reserved: [])) }
            let leaseID = s.addLease(Lease(kind: .place, tenant: tenant, owner: owner, pool: poolID, slots: reserved.map(\.slot)))
            precondition(leaseID == id, "a VRAM placement's lease id changed while its slots were reserved")
            s.counters.placedSlots += reserved.count
            return .success(Placement(leaseID: leaseID, residentTokens: residentTokens, reserved: reserved))
        }
        return try result.get()
    }

    /// The pages of `owner`'s placement `leaseID` are written: they become resident (one use
    /// each), and the lease ends.
    public func commit(_ tenant: TenantID, owner: UInt64, leaseID: UInt64) throws(StoreError) {
        let now = now()
        let committed = state.withLock { s -> Bool in
            guard let lease = s.leases[leaseID], lease.kind == .place, lease.tenant == tenant, lease.owner == owner else { return false }
            _ = s.removeLease(leaseID)
            guard var pool = s.pools[lease.pool] else { return true }
            for slot in lease.slots {
                guard case .writing(let holder, let page) = pool.slots[slot], holder == leaseID else { continue }
                pool.slots[slot] = .resident(Resident(page: page.address, tokens: page.tokens, uses: 1, lastUseMicros: now))
                pool.writingCount -= 1
                pool.residentCount += 1
            }
            s.pools[lease.pool] = pool
            s.counters.commits += 1
            return true
        }
        guard committed else {
            throw .notFound("no VRAM_PLACE lease \(leaseID) of this connection (committed or released already, its pool's connection closed, or another connection's): commit each placement once, on the connection that placed it")
        }
    }

    /// Leases the slots of the leading pages of `pages` resident in one pool of `tenant` (the
    /// pool with the longest run from page 0), counting a use of each; nil when no pool holds
    /// the first page.
    public func lease(_ tenant: TenantID, owner: UInt64, pages: [Page]) throws(StoreError) -> Lent? {
        let now = now()
        let result = state.withLock { s -> Result<Lent?, StoreError> in
            guard let best = s.bestPool(tenant, pages), var pool = s.pools[best.id] else {
                s.counters.leaseMisses += 1
                return .success(nil)
            }
            if let refusal = s.refusal(tenant: tenant, owner: owner, readerSlots: best.run, limits) { return .failure(.overBudget(refusal)) }
            var lent: [(tokens: Int, slot: Int)] = []
            lent.reserveCapacity(best.run)
            for page in pages.prefix(best.run) {
                guard let held = pool.resident(page.address) else { break }
                let slot = held.slot
                var resident = held.page
                resident.readers += 1
                use(&resident, now: now)
                pool.slots[slot] = .resident(resident)
                lent.append((resident.tokens, slot))
            }
            s.pools[best.id] = pool
            let leaseID = s.addLease(Lease(kind: .read, tenant: tenant, owner: owner, pool: best.id, slots: lent.map(\.slot)))
            s.counters.leaseHits += 1
            return .success(Lent(pool: pool.info, leaseID: leaseID, tokens: lent.reduce(0) { $0 + $1.tokens }, pages: lent))
        }
        return try result.get()
    }

    /// `VRAM_DROP`: pool `poolID`, registered by connection `owner`, leaves the directory for new
    /// requests at once (its placements in progress end unwritten); returns the reader leases
    /// still on it. The pool is forgotten when that count is 0, so the owner may free its memory.
    public func retire(_ tenant: TenantID, owner: UInt64, poolID: UInt32) throws(StoreError) -> Int {
        let readers = state.withLock { s -> Int? in
            guard var pool = s.pools[poolID], pool.tenant == tenant, pool.owner == owner else { return nil }
            if !pool.retired {
                pool.retired = true
                s.pools[poolID] = pool
                s.poolsOfTenant[tenant]?.removeAll { $0 == poolID }
                if s.poolsOfTenant[tenant]?.isEmpty == true { s.poolsOfTenant[tenant] = nil }
                for id in pool.leases where s.leases[id]?.kind == .place { s.endLease(id) }
            }
            let readers = s.pools[poolID]!.leases.count
            if readers == 0 { s.dropPool(poolID) }
            return readers
        }
        guard let readers else {
            throw .notFound("no VRAM pool \(poolID) registered by this connection (dropped already, or another connection's): VRAM_DROP is for the connection that sent VRAM_POOL")
        }
        return readers
    }

    /// Ends lease `leaseID` of `tenant` (a placement or a reader, of any of its connections);
    /// false when the directory has no such lease (it may be the store's).
    public func release(_ tenant: TenantID, leaseID: UInt64) -> Bool {
        state.withLock { s in
            guard let lease = s.leases[leaseID], lease.tenant == tenant else { return false }
            s.endLease(leaseID)
            return true
        }
    }

    /// Connection `owner` closed: its pools end (with what is resident in them and every lease on
    /// them, other connections' included), and its leases on other pools are released.
    public func connectionClosed(owner: UInt64) {
        state.withLock { s in
            for id in s.poolsOfOwner[owner] ?? [] { s.dropPool(id) }
            for id in s.leasesOfOwner[owner] ?? [] { s.endLease(id) }
        }
    }

    // MARK: status

    /// Gauges and counters for `STATUS` and /metrics.
    public func status() -> [(name: String, value: UInt64)] {
        state.withLock { s in
            var slots = 0, resident = 0, writing = 0
            for pool in s.pools.values {
                slots += pool.info.slots
                resident += pool.residentCount
                writing += pool.writingCount
            }
            let c = s.counters
            return [
                ("vram_pools", UInt64(s.pools.count)), ("vram_slots", UInt64(slots)), ("vram_resident_slots", UInt64(resident)),
                ("vram_writing_slots", UInt64(writing)), ("vram_leases", UInt64(s.leases.count)),
                ("vram_placements", UInt64(c.placements)), ("vram_placed_slots", UInt64(c.placedSlots)),
                ("vram_commits", UInt64(c.commits)), ("vram_evictions", UInt64(c.evictions)),
                ("vram_lease_hits", UInt64(c.leaseHits)), ("vram_lease_misses", UInt64(c.leaseMisses)),
            ]
        }
    }
}
