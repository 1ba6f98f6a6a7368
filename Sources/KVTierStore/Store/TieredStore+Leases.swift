import KVTierCore

extension TieredStore {
    /// Every lease of the store, with the indexes that keep each request's work proportional to
    /// its own size: by owner (a connection; `releaseAll`), a count per tenant (the limits), and
    /// each staging extent's lease by tenant and offset (`claimStaging`). Used under the store's
    /// lock.
    struct LeaseTable {
        struct StagingKey: Hashable {
            var tenant: TenantID
            var offset: Int
        }

        private(set) var byID: [UInt64: Lease] = [:]
        private var byOwner: [UInt64: Set<UInt64>] = [:]
        private var countByTenant: [TenantID: Int] = [:]
        private var stagingLease: [StagingKey: UInt64] = [:]
        private var nextID: UInt64 = 1

        var count: Int { byID.count }

        subscript(id: UInt64) -> Lease? { byID[id] }

        /// Why a new lease of `owner` in `tenant` would pass a limit, or nil when it may be taken.
        func refusal(tenant: TenantID, owner: UInt64, _ limits: Configuration) -> String? {
            if let held = byOwner[owner]?.count, held >= limits.maxLeasesPerConnection {
                return "this connection holds \(held) leases, the most one connection may (maxLeasesPerConnection \(limits.maxLeasesPerConnection)): RELEASE leases it no longer reads"
            }
            if let held = countByTenant[tenant], held >= limits.maxLeasesPerTenant {
                return "this tenant's connections hold \(held) leases, the most one tenant may (maxLeasesPerTenant \(limits.maxLeasesPerTenant)): RELEASE leases no longer read"
            }
            return nil
        }

        /// Adds a lease (the caller checked `refusal`) and returns its id.
        mutating func add(_ lease: Lease) -> UInt64 {
            let id = nextID
            nextID += 1
            byID[id] = lease
            byOwner[lease.owner, default: []].insert(id)
            countByTenant[lease.tenant, default: 0] += 1
            for extent in lease.staging { stagingLease[StagingKey(tenant: lease.tenant, offset: extent.offset)] = id }
            return id
        }

        /// Removes a lease and returns it.
        mutating func remove(_ id: UInt64) -> Lease? {
            guard let lease = byID.removeValue(forKey: id) else { return nil }
            byOwner[lease.owner]?.remove(id)
            if byOwner[lease.owner]?.isEmpty == true { byOwner[lease.owner] = nil }
            countByTenant[lease.tenant, default: 1] -= 1
            if countByTenant[lease.tenant] == 0 { countByTenant[lease.tenant] = nil }
            for extent in lease.staging { stagingLease[StagingKey(tenant: lease.tenant, offset: extent.offset)] = nil }
            return lease
        }

        /// The ids of `owner`'s leases.
        func ids(of owner: UInt64) -> [UInt64] { Array(byOwner[owner] ?? []) }

        /// Whether `extent` is an unconsumed staging extent of a lease of `owner` in `tenant`.
        func holdsStaging(_ extent: Extent, tenant: TenantID, owner: UInt64) -> Bool {
            guard let id = stagingLease[StagingKey(tenant: tenant, offset: extent.offset)], let lease = byID[id] else { return false }
            return lease.owner == owner && lease.staging.contains(extent)
        }

        /// Takes a staging extent out of its lease (checked with `holdsStaging`); an ALLOC lease
        /// whose extents are all consumed is over.
        mutating func consumeStaging(_ extent: Extent, tenant: TenantID) {
            let key = StagingKey(tenant: tenant, offset: extent.offset)
            guard let id = stagingLease.removeValue(forKey: key) else { return }
            byID[id]?.staging.remove(extent)
            if let left = byID[id], left.staging.isEmpty, left.pages.isEmpty { _ = remove(id) }
        }
    }
}
