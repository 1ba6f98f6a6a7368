#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import KVTierCodec
import KVTierCore
import Logging
import Synchronization

/// The daemon's store: a RAM tier of pages in each tenant's shared memory, over the disk tier.
///
/// Pages are addressed by tenant and hash-chain key (`PageKeyChain`), so equal prefixes map to
/// the same pages in every process and are stored once. A page lives in RAM, on disk, or both;
/// over the RAM budget the coldest pages without a lease move to disk. `get` promotes disk pages
/// into RAM and leases them to the client until `release`.
public final class TieredStore: Sendable {
    public struct Configuration: Sendable {
        /// Most bytes of pages held in RAM, over all tenants.
        public var ramBudgetBytes = 1 << 30
        /// Virtual size of each tenant's page arena (memory is committed only as pages are
        /// written, and never given back: docs/security.md). The daemon derives it from
        /// the tenant RAM quota.
        public var arenaBytes = 64 << 30
        /// Most bytes of pages one tenant may hold in RAM, leased ones included; a tenant at its
        /// quota evicts its own pages.
        public var tenantRAMQuotaBytes = 1 << 30
        /// Size of each tenant's staging arena (client-writable memory for shared-memory PUTs).
        public var stagingBytes = TenantLimits.defaultStagingBytes
        /// Leases one connection, and all of one tenant's connections, may hold at once.
        public var maxLeasesPerConnection = TenantLimits.maxLeasesPerConnection
        public var maxLeasesPerTenant = TenantLimits.maxLeasesPerTenant
        /// Codec of pages written to disk (under the `fixed` codec policy; under `auto`, of a
        /// model's pages until its first sample is measured).
        public var diskCodec = Codec(.k4v4)
        /// Whether each tenant's models get a disk codec measured on their own pages.
        public var codecPolicy = CodecPolicy.Configuration()
        /// A page promoted to RAM or written there stays at least this long before eviction.
        public var minResidenceMicros: UInt64 = 2_000_000
        /// Half-life of a page's heat.
        public var heatHalfLifeMicros: UInt64 = 60_000_000
        /// How eviction picks the page to move to disk.
        public var evictionPolicy = EvictionPolicy.heat
        /// RAM the background evictor keeps free below the budget (and below each tenant's
        /// quota), so puts find room without waiting for pages to be written to disk. It starts
        /// when less than half of this is free and stops when all of it is; nil: an eighth of
        /// the budget, and at least 64 MiB (half the budget at most).
        public var evictionHeadroomBytes: Int? = nil
        /// Disk pages one `ATTENTION` report may start prefetching (those with the most mass
        /// first): a client that reports the attention it expects next gets those pages read into
        /// RAM before it asks for them. 0: reports only feed heat.
        public var attentionPrefetchPages = 64
        /// Least mass a page must be reported with to be prefetched (a step's masses sum to
        /// about 1, so 0.01 is a hundredth of its attention).
        public var attentionPrefetchMinMass: Float = 0.01
        /// Most models one tenant may register while the daemon runs (`register(_:for:)`).
        public var maxModelsPerTenant = 256
        public init() {}
    }

    /// Eviction order of the RAM tier.
    public enum EvictionPolicy: String, Sendable, CaseIterable {
        /// Coldest first: uses plus attention, halving every `heatHalfLifeMicros` since the last
        /// access; pages younger than `minResidenceMicros` go last.
        case heat
        /// Least recently used first (last access only: no uses, attention or minimum residence).
        case lru
    }

    struct Resident {
        var extent: Extent
        var modelID: UInt64
        var tokens: Int
        var leases = 0
        /// The store's own short holds on the page (a disk write encoding from it, a merge
        /// reading it): like a lease, it cannot be evicted or dropped meanwhile, but no client's
        /// quota counts them.
        var holds = 0
        var uses = 1.0
        var attention = 0.0
        var lastAccessMicros: UInt64
        var residentSinceMicros: UInt64
        var onDisk: Bool
        /// Loaded by prefetch and not yet served: the first lease counts a useful prefetch.
        var prefetched = false
        /// Promoted from the remote tier: its record is there already, so writing it to disk
        /// sends no copy back.
        var fromRemote = false
    }

    struct Lease {
        var tenant: TenantID
        /// The connection holding it; its leases end when it closes.
        var owner: UInt64
        var pages: [PageAddress]
        /// Staging extents of an ALLOC not yet consumed by a PUT.
        var staging: Set<Extent>
    }

    struct State {
        var models: [UInt64: ModelSpec] = [:]
        var resident: [PageAddress: Resident] = [:]
        var memories: [TenantID: any PageMemory] = [:]
        /// Leases, indexed by owner and tenant and their staging extents by offset, so no
        /// request does work in proportion to the leases others hold (TieredStore+Leases).
        var leases = LeaseTable()
        var ramBytes = 0
        /// Bytes of each tenant's RAM pages (leased ones included): what its quota limits.
        var tenantRAM: [TenantID: Int] = [:]
        /// Bytes of each tenant's RAM pages that some lease holds (cannot be evicted).
        var tenantLeased: [TenantID: Int] = [:]
        /// Heat of pages when they left RAM, so prefetch can load the hottest first.
        var evictedHeat: [PageAddress: Double] = [:]
        /// Disk pages being read into RAM, with whoever waits for them (`load`).
        var loading: [PageAddress: Loading] = [:]
        /// The background evictor is running (`scheduleEviction`).
        var evicting = false
        /// It last stopped with nothing it could evict while RAM still wanted headroom.
        var evictionStalled = false
        var counters = Counters()

        /// Leases a resident page to a client's GET: counts the use (and a prefetch that paid
        /// off). Nil when the page is not in RAM.
        mutating func lease(_ address: PageAddress, now: UInt64) -> Resident? {
            guard resident[address] != nil else { return nil }
            addLease(address)
            var page = resident[address]!
            page.uses += 1
            page.lastAccessMicros = now
            if page.prefetched {
                page.prefetched = false
                counters.prefetchUseful += 1
            }
            resident[address] = page
            return page
        }

        // Every change of residency and leases goes through these four, which keep the
        // per-tenant figures the quotas read.

        mutating func insertResident(_ address: PageAddress, _ page: Resident) {
            precondition(resident[address] == nil, "a page made resident twice")
            resident[address] = page
            ramBytes += page.extent.length
            tenantRAM[address.tenant, default: 0] += page.extent.length
            if page.leases > 0 { tenantLeased[address.tenant, default: 0] += page.extent.length }
        }

        mutating func removeResident(_ address: PageAddress) -> Resident? {
            guard let page = resident.removeValue(forKey: address) else { return nil }
            ramBytes -= page.extent.length
            Self.subtract(page.extent.length, from: &tenantRAM, address.tenant)
            if page.leases > 0 { Self.subtract(page.extent.length, from: &tenantLeased, address.tenant) }
            return page
        }

        mutating func addLease(_ address: PageAddress) {
            guard var page = resident[address] else { return }
            if page.leases == 0 { tenantLeased[address.tenant, default: 0] += page.extent.length }
            page.leases += 1
            resident[address] = page
        }

        /// A store-internal hold (`Resident.holds`); false when the page is not in RAM.
        mutating func hold(_ address: PageAddress) -> Bool {
            guard resident[address] != nil else { return false }
            resident[address]!.holds += 1
            return true
        }

        mutating func endHold(_ address: PageAddress) {
            guard resident[address] != nil else { return }
            resident[address]!.holds -= 1
        }

        mutating func endLease(_ address: PageAddress) {
            guard var page = resident[address] else { return }
            page.leases -= 1
            if page.leases == 0 { Self.subtract(page.extent.length, from: &tenantLeased, address.tenant) }
            resident[address] = page
        }

        private static func subtract(_ bytes: Int, from table: inout [TenantID: Int], _ tenant: TenantID) {
            let left = (table[tenant] ?? 0) - bytes
            table[tenant] = left > 0 ? left : nil
        }
    }

    struct Counters {
        var lookups = 0, hitsRAM = 0, hitsDisk = 0, misses = 0
        var puts = 0, pagesStored = 0, pagesDeduplicated = 0
        var gets = 0, promotions = 0, evictions = 0, diskWriteFailures = 0
        /// Prefetch: pages queued (not in RAM nor loading), read in, then leased by a GET before
        /// leaving RAM (useful), or evicted without one (wasted); late: pages a GET asked for
        /// while prefetch was still reading them (the GET waited for that read).
        var prefetchIssued = 0, prefetchLoaded = 0, prefetchUseful = 0, prefetchWasted = 0, prefetchLate = 0
        var sessionsExpired = 0
        /// Puts that waited for eviction because RAM had no room left (the background evictor
        /// fell behind); with headroom to spare this stays 0.
        var putsWaited = 0
        /// Lookups whose slowest page is in the remote tier; pages promoted from there; remote
        /// values refused by `RemoteRecord.open` (bad MAC, wrong page, damage).
        var hitsRemote = 0, remotePromotions = 0, remoteRejected = 0
    }

    /// A request's result: given at once, or the rest of the work, which waits for disk I/O,
    /// eviction or durability. The daemon answers `done` on the connection's thread and runs
    /// `pending` as a task; both come from one plan of the request (one locate).
    public enum Outcome<Value: Sendable>: Sendable {
        case done(Value)
        case pending(@Sendable () async throws(StoreError) -> Value)

        /// The result, waiting for the pending work if there is some.
        public func value() async throws(StoreError) -> Value {
            switch self {
            case .done(let value): return value
            case .pending(let rest): return try await rest()
            }
        }
    }

    let configuration: Configuration
    let disk: DiskTier?
    let makeMemory: @Sendable (TenantID) throws -> any PageMemory
    let logger: Logger
    let state = Mutex(State())
    /// One eviction step at a time (choose, write, free): two evictors choosing the same pages
    /// would each find the other's write lease and free nothing.
    let evictionGate = AsyncGate()
    /// The background evictor's task while it runs (`scheduleEviction`).
    let evictor = Mutex<Task<Void, Never>?>(nil)
    /// The store's counters and gauges as `status` last read them, served while the store's
    /// lock is busy so that STATUS and the watchdog never queue behind requests.
    let statusSnapshot = Mutex<[(name: String, value: UInt64)]>([])
    /// Registered models and named sessions (persisted when the catalog has storage).
    public let catalog: SessionCatalog
    /// The disk codec of each tenant's model.
    public let codecPolicy: CodecPolicy
    /// The remote tier (T3), when one is configured (TieredStore+Remote).
    let remote: RemoteAttachment?

    /// `makeMemory` creates a tenant's memory the first time the tenant stores or reads a page.
    /// `catalog` brings the models and sessions of earlier runs; by default they live in
    /// memory only.
    /// `remote`: the remote tier pages are shared through with other hosts (none by default).
    public init(configuration: Configuration, disk: DiskTier?, catalog: SessionCatalog? = nil, remote: RemoteAttachment? = nil,
                logger: Logger, makeMemory: @escaping @Sendable (TenantID) throws -> any PageMemory) {
        self.configuration = configuration
        self.disk = disk
        self.remote = remote
        self.logger = logger
        self.makeMemory = makeMemory
        codecPolicy = CodecPolicy(configuration: configuration.codecPolicy, defaultCodec: configuration.diskCodec)
        let catalog = catalog ?? SessionCatalog(logger: logger)
        self.catalog = catalog
        state.withLock { s in
            for model in catalog.models { s.models[model.id] = model }
        }
        disk?.setSessionHolds { [catalog] address in catalog.hold(on: address) }
        if remote != nil {
            disk?.setRecordCopies { [weak self] copies in self?.offerRemote(copies) }
        }
    }

    /// The size of a tenant's page arena for a RAM quota: the quota plus fragmentation slack
    /// (`TenantLimits.pageArenaSlackPer1024` of it, plus `pageArenaSlackBytes`), at most `ceiling`.
    public static func pageArenaBytes(quota: Int, ceiling: Int) -> Int {
        let slack = quota / 1024 * TenantLimits.pageArenaSlackPer1024 + TenantLimits.pageArenaSlackBytes
        let wanted = quota.addingReportingOverflow(slack).partialValue
        let granule = ExtentAllocator.granuleBytes
        return max(granule, min(ceiling, max(wanted, quota)) / granule * granule)
    }

    // MARK: models

    /// Registers a model on behalf of `tenant` (idempotent), which may register at most
    /// `maxModelsPerTenant` while the daemon runs, and sees only those (and its sessions'
    /// models) in `models(of:)`.
    @discardableResult
    public func register(_ model: ModelSpec, for tenant: TenantID) throws(StoreError) -> ModelSpec {
        try Self.validate(model)
        try catalog.register(model, for: tenant, maxModelsPerTenant: configuration.maxModelsPerTenant)
        state.withLock { $0.models[model.id] = model }
        return model
    }

    /// The models `tenant` registered while the daemon runs, and its sessions' models, by id.
    public func models(of tenant: TenantID) -> [ModelSpec] {
        catalog.models(of: tenant).sorted { $0.id < $1.id }
    }

    /// Registers a model (idempotent) and returns it, for no tenant in particular (tools, tests).
    @discardableResult
    public func register(_ model: ModelSpec) throws(StoreError) -> ModelSpec {
        try Self.validate(model)
        try catalog.record(model)
        state.withLock { $0.models[model.id] = model }
        return model
    }

    static func validate(_ model: ModelSpec) throws(StoreError) {
        try ModelSpec.validate(name: model.name)
        // Part of the fingerprint only, but a NaN would never equal itself in the catalog.
        guard model.ropeTheta.isFinite else {
            throw .invalidArgument("ropeTheta \(model.ropeTheta) is not a finite number: send the model's RoPE base (0 if it has none)")
        }
        if let violation = model.shape.limitViolation { throw .invalidArgument("model shape out of range: \(violation)") }
        guard model.pageTokens >= 1, model.pageTokens <= Limits.maxPageTokens else {
            throw .invalidArgument("model shape out of range: \(model.pageTokens) tokens per page; use 1...\(Limits.maxPageTokens)")
        }
        // Each factor is bounded above, so the product fits an Int; a page of one layer beyond
        // this is more than the codecs, the disk format and an inline frame can carry.
        let sectionBytes = model.pageTokens * 2 * model.kvHeads * model.headDim * model.elementType.byteWidth
        guard sectionBytes <= Limits.maxSectionBytes else {
            throw .invalidArgument("a page of one layer of this model takes \(sectionBytes) bytes, over the \(Limits.maxSectionBytes) allowed (Limits.maxSectionBytes): register fewer tokens per page")
        }
        // A codec the client chose is a promise about every page of the model: one that cannot
        // encode this head dimension is refused now rather than replaced by fp16 at each write.
        if let codec = model.diskCodec {
            do { try codec.quantizer.check(model.pageShape(tokens: 1).section) } catch {
                throw .invalidArgument("disk codec \(codec.name) cannot store this model (head dim \(model.headDim); \(codec.quantizer.name) takes head dims: \(codec.quantizer.headDimRule)): choose another codec, e.g. fp16 or q8")
            }
        }
    }

    public func model(_ id: UInt64) throws(StoreError) -> ModelSpec {
        guard let model = state.withLock({ $0.models[id] }) else { throw .unknownModel(id) }
        return model
    }

    /// The tenant's page memory (its shared arena), created on first use.
    public func memory(for tenant: TenantID) throws(StoreError) -> any PageMemory {
        if let memory = state.withLock({ $0.memories[tenant] }) { return memory }
        let created: any PageMemory
        do { created = try makeMemory(tenant) } catch {
            throw .unavailable("cannot create shared memory for tenant \(tenant): \(error)")
        }
        return state.withLock { s in
            if let existing = s.memories[tenant] { return existing }
            s.memories[tenant] = created
            return created
        }
    }

    // MARK: lookup

    public enum Tier: Sendable, Equatable { case ram, disk, remote }

    /// One page of a cached prefix.
    public struct PageRef: Sendable, Equatable {
        public var address: PageAddress
        /// Tokens of the request this page covers.
        public var tokens: Range<Int>
        public var tier: Tier
    }

    public struct LookupResult: Sendable, Equatable {
        public var cachedTokens: Int
        public var ramTokens: Int
        public var diskTokens: Int
        /// Tokens of pages only the remote tier holds.
        public var remoteTokens = 0
        public var estimatedLoadMicros: UInt64
        public var pages: [PageRef]
    }

    /// Restore bandwidth assumed for load estimates until measured: disk pages at 2 GB/s of
    /// fp16, RAM pages at 20 GB/s.
    static let estimatedDiskBytesPerMicro = 2_000.0
    static let estimatedRAMBytesPerMicro = 20_000.0
    /// Remote pages at 1 GB/s of fp16 (a 10 Gb/s link, or Redis on the same host).
    static let estimatedRemoteBytesPerMicro = 1_000.0

    /// The longest cached prefix of `tokens`: whole pages along the hash chain, then the longest
    /// stored partial page (a sequence's last page, kept at its exact length).
    public func lookup(_ tenant: TenantID, modelID: UInt64, tokens: [UInt32]) throws(StoreError) -> LookupResult {
        let model = try model(modelID)
        let pages = locateIncludingRemote(tenant, model, tokens, keys: Self.wholePageKeys(model, tokens))
        var result = LookupResult(cachedTokens: pages.last?.tokens.upperBound ?? 0, ramTokens: 0, diskTokens: 0,
                                  estimatedLoadMicros: 0, pages: pages)
        var micros = 0.0
        for page in pages {
            let bytes = Double(page.tokens.count * model.bytesPerToken)
            switch page.tier {
            case .ram:
                result.ramTokens += page.tokens.count
                micros += bytes / Self.estimatedRAMBytesPerMicro
            case .disk:
                result.diskTokens += page.tokens.count
                micros += bytes / Self.estimatedDiskBytesPerMicro
            case .remote:
                result.remoteTokens += page.tokens.count
                micros += bytes / Self.estimatedRemoteBytesPerMicro
            }
        }
        result.estimatedLoadMicros = UInt64(micros.rounded(.up))
        state.withLock { s in
            s.counters.lookups += 1
            if pages.isEmpty {
                s.counters.misses += 1
            } else if result.remoteTokens > 0 {
                s.counters.hitsRemote += 1
            } else if result.diskTokens > 0 {
                s.counters.hitsDisk += 1
            } else {
                s.counters.hitsRAM += 1
            }
        }
        return result
    }

    /// The pages of the cached prefix of `tokens` as `lookup` finds them (`LookupResult.pages`),
    /// without counting a lookup: for the VRAM directory, which places and leases copies of them.
    public func cachedPages(_ tenant: TenantID, modelID: UInt64, tokens: [UInt32]) throws(StoreError) -> [PageRef] {
        let model = try model(modelID)
        return locateIncludingRemote(tenant, model, tokens, keys: Self.wholePageKeys(model, tokens))
    }

    /// Half-life of a page's heat (`Configuration.heatHalfLifeMicros`), which the VRAM directory
    /// decays its slots' uses with too.
    public var heatHalfLifeMicros: UInt64 { configuration.heatHalfLifeMicros }

    /// Whether each address is stored in either tier: RAM under one lock of the store, the disk
    /// tier under one of its own for the rest.
    func inEitherTier(_ addresses: [PageAddress]) -> [Bool] {
        let inRAM = state.withLock { s in addresses.map { s.resident[$0] != nil } }
        guard let disk, inRAM.contains(false) else { return inRAM }
        let onDisk = disk.containsEach(addresses, skipping: inRAM)
        return addresses.indices.map { inRAM[$0] || onDisk[$0] }
    }

    /// The keys of the whole pages of `tokens` (at most `limit` of them), hashed once per
    /// request: every step of the request reads them from here.
    static func wholePageKeys(_ model: ModelSpec, _ tokens: [UInt32], limit: Int = .max) -> [PageKey] {
        PageKeyChain.keys(modelID: model.id, tokens: tokens, pageTokens: model.pageTokens, wholePagesOnly: true, limit: limit)
    }

    func locate(_ tenant: TenantID, _ model: ModelSpec, _ tokens: [UInt32]) -> [PageRef] {
        locate(tenant, model, tokens, keys: Self.wholePageKeys(model, tokens))
    }

    /// The cached prefix of `tokens` from the keys of its whole pages (`wholePageKeys`): RAM
    /// residency of every page read under one lock of the store, the disk tier asked once for
    /// the others, then the longest stored partial page where the whole pages end (its
    /// candidate keys hashed outside any lock). No key is hashed twice.
    /// A partial page starting at or after `partialBefore` is not searched for (a GET's
    /// `maxTokens` would not serve it).
    func locate(_ tenant: TenantID, _ model: ModelSpec, _ tokens: [UInt32], keys: [PageKey], partialBefore: Int = .max) -> [PageRef] {
        let size = model.pageTokens
        let addresses = keys.map { PageAddress(tenant: tenant, key: $0) }
        let inRAM = state.withLock { s in addresses.map { s.resident[$0] != nil } }
        // All in RAM (a hit, the common case): the disk tier's lock is not taken.
        let onDisk = !inRAM.contains(false) ? inRAM.map { _ in false }
            : disk?.containsEach(addresses, skipping: inRAM) ?? Array(repeating: false, count: addresses.count)
        var pages: [PageRef] = []
        for (index, address) in addresses.enumerated() {
            guard inRAM[index] || onDisk[index] else { break }
            pages.append(PageRef(address: address, tokens: index * size..<(index + 1) * size, tier: inRAM[index] ? .ram : .disk))
        }
        // Where the whole pages end: the longest stored partial page of what is left.
        let start = pages.count * size
        guard start < tokens.count, start < partialBefore else { return pages }
        let candidates = PageKeyChain.partialKeys(parent: pages.last?.address.key, modelID: model.id,
                                                  tokens: tokens[start..<min(tokens.count, start + size - 1)])
        if let (address, count, tier) = longestStored(tenant, candidates) {
            pages.append(PageRef(address: address, tokens: start..<start + count, tier: tier))
        }
        return pages
    }

    /// The longest of `candidates` (keys of 1, 2, … tokens) stored in either tier: one lock of
    /// the store, one of the disk tier.
    func longestStored(_ tenant: TenantID, _ candidates: [PageKey]) -> (PageAddress, Int, Tier)? {
        guard !candidates.isEmpty else { return nil }
        let addresses = candidates.map { PageAddress(tenant: tenant, key: $0) }
        let ram = state.withLock { s in addresses.lastIndex { s.resident[$0] != nil } }
        let disk = self.disk?.lastContained(addresses)
        switch (ram, disk) {
        case (nil, nil): return nil
        case (let r?, nil): return (addresses[r], r + 1, .ram)
        case (nil, let d?): return (addresses[d], d + 1, .disk)
        case (let r?, let d?): return r >= d ? (addresses[r], r + 1, .ram) : (addresses[d], d + 1, .disk)
        }
    }
}
