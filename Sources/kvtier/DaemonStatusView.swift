import KVTierCore

/// What `kvtier status` and `kvtier top` show, built from the daemon's `STATUS` counters (names
/// as `TieredStore.status()` reports them). A counter the daemon does not report counts as 0,
/// so an older daemon still shows a table.
struct DaemonStatusView: Encodable {
    struct Tier: Encodable {
        var pages: UInt64
        var bytes: UInt64
        /// nil where the daemon reports no budget for the tier.
        var budgetBytes: UInt64?
        /// Lookups whose slowest page came from this tier.
        var hits: UInt64
        /// `hits` over all lookups; nil before the first lookup.
        var hitRate: Double?
    }

    /// Disk pages prefetch read ahead of a GET (on session resume, pin, or an ATTENTION report).
    struct Prefetch: Encodable {
        /// Queued: on disk, neither in RAM nor being read.
        var issued: UInt64
        var loaded: UInt64
        /// Leased by a GET before they left RAM.
        var used: UInt64
        /// Evicted without a GET having used them.
        var wasted: UInt64
        /// Asked for by a GET while still being read (counted in `used` too).
        var late: UInt64
        /// `used` over `issued`; nil before the first prefetch.
        var accuracy: Double?
    }

    var socket: String
    var tiers: [String: Tier]
    /// Named sessions (the daemon's `sessions` counter; 0 where it has none).
    var sessions: UInt64
    var lookups: UInt64
    var misses: UInt64
    var leases: UInt64
    var models: UInt64
    var tenants: UInt64
    var prefetch: Prefetch
    /// Every counter as the daemon reported it.
    var counters: [String: UInt64]
    /// The disk codec of each of the tenant's models (`kvtier status`; `top` leaves it empty).
    var codecs: [CodecChoiceView] = []

    init(socket: String, counters: [String: UInt64]) {
        func value(_ name: String) -> UInt64 { counters[name] ?? 0 }
        let lookups = value("lookups")
        func rate(_ hits: UInt64) -> Double? { lookups == 0 ? nil : Double(hits) / Double(lookups) }
        self.socket = socket
        self.counters = counters
        self.lookups = lookups
        misses = value("lookup_misses")
        sessions = value("sessions")
        leases = value("leases")
        models = value("models")
        tenants = value("tenants")
        let issued = value("prefetch_issued")
        prefetch = Prefetch(issued: issued, loaded: value("prefetch_loaded"), used: value("prefetch_useful"),
                            wasted: value("prefetch_wasted"), late: value("prefetch_late"), accuracy: issued == 0 ? nil : Double(value("prefetch_useful")) / Double(issued))
        tiers = [
            "ram": Tier(pages: value("ram_pages"), bytes: value("ram_bytes"), budgetBytes: counters["ram_budget_bytes"],
                        hits: value("lookup_hits_ram"), hitRate: rate(value("lookup_hits_ram"))),
            "disk": Tier(pages: value("disk_pages"), bytes: value("disk_live_bytes"), budgetBytes: counters["disk_budget_bytes"],
                         hits: value("lookup_hits_disk"), hitRate: rate(value("lookup_hits_disk"))),
        ]
        // The remote tier, when the daemon has one: the pages this daemon wrote there and keeps
        // (others' pages are not counted), its budget, and lookups it completed.
        if counters["remote_up"] != nil {
            tiers["remote"] = Tier(pages: value("remote_pages"), bytes: value("remote_bytes"), budgetBytes: counters["remote_budget_bytes"],
                                   hits: value("lookup_hits_remote"), hitRate: rate(value("lookup_hits_remote")))
        }
    }

    /// The prefetch row of `kvtier status`: "issued 40, loaded 40, used 36 (90.0%, 3 late), wasted 2".
    var prefetchSummary: String {
        "issued \(prefetch.issued), loaded \(prefetch.loaded), used \(prefetch.used) (\(prefetch.accuracy.map(Self.percent) ?? "-"), \(prefetch.late) late), wasted \(prefetch.wasted)"
    }

    /// The VRAM tier's row of `kvtier status` (docs/vram-tier.md): "2 pools, 64 of 1024 slots
    /// resident (3 being written), 5 leases; leases 40 hit / 2 missed, 12 evictions", nil while
    /// no pool was ever registered.
    var vramSummary: String? {
        func value(_ name: String) -> UInt64 { counters[name] ?? 0 }
        guard value("vram_pools") > 0 || value("vram_placements") > 0 || value("vram_lease_hits") > 0 else { return nil }
        return "\(value("vram_pools")) pools, \(value("vram_resident_slots")) of \(value("vram_slots")) slots resident"
            + " (\(value("vram_writing_slots")) being written), \(value("vram_leases")) leases;"
            + " leases \(value("vram_lease_hits")) hit / \(value("vram_lease_misses")) missed, \(value("vram_evictions")) evictions"
    }

    static let tierOrder = ["ram", "disk", "remote"]

    /// The remote tier's state line (`kvtier status`), nil without one.
    var remoteSummary: String? {
        guard let up = counters["remote_up"] else { return nil }
        func value(_ name: String) -> UInt64 { counters[name] ?? 0 }
        return (up == 1 ? "up" : "DOWN (serving misses, retrying)")
            + ", queue \(ByteCount(Int(clamping: value("remote_queue_bytes"))))"
            + ", written \(value("remote_writes")), dropped \(value("remote_writes_dropped")), refused \(value("remote_write_errors"))"
            + ", promoted \(value("remote_promotions")), rejected \(value("remote_rejected")), failures \(value("remote_failures"))"
    }

    /// The tier table: one row per tier, human units.
    var tierRows: [[String]] {
        Self.tierOrder.compactMap { name in
            guard let tier = tiers[name] else { return nil }
            let budget = tier.budgetBytes.map { "\(ByteCount(Int(clamping: $0)))" } ?? "-"
            let used = tier.budgetBytes.flatMap { $0 == 0 ? nil : Self.percent(Double(tier.bytes) / Double($0)) } ?? "-"
            return [name, "\(tier.pages)", "\(ByteCount(Int(clamping: tier.bytes)))", budget, used,
                    "\(tier.hits)", tier.hitRate.map(Self.percent) ?? "-"]
        }
    }

    static let tierHeader = ["TIER", "PAGES", "BYTES", "BUDGET", "USED", "HITS", "HIT RATE"]

    static func percent(_ fraction: Double) -> String {
        let tenths = Int((fraction * 1000).rounded())
        return "\(tenths / 10).\(tenths % 10)%"
    }
}
