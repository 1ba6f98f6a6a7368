import CoreMetrics
import KVTierCore
import KVTierProtocol
import KVTierStore
import Prometheus
import Synchronization

/// kvtierd's Prometheus metrics (`kvtier_*`). The store and the server keep their own counters
/// (`TieredStore.status()`, `ServerCounters`); a scrape copies them into these metric objects,
/// which are created once here, so the hot path pays nothing for metrics it does not time.
/// Request latency is timed as it happens, through swift-metrics (`timer(for:)`).
///
/// Names and meanings: docs/operations.md, "What to watch".
public final class DaemonMetrics: Sendable {
    public let registry = PrometheusCollectorRegistry()
    /// swift-metrics factory writing into `registry`; handed to code that records as it goes.
    public let factory: PrometheusMetricsFactory

    /// Request latency buckets: a RAM-tier round trip is tens of microseconds, a cold disk read
    /// milliseconds, a large batched GET up to a second.
    public static let latencyBuckets: [Duration] = [
        .microseconds(50), .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1),
        .microseconds(2500), .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50),
        .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .microseconds(2_500_000),
    ]
    public static let requestDurationName = "kvtier_request_duration_seconds"

    /// A store or server counter exported as a Prometheus counter or gauge.
    struct Mapping {
        enum Kind { case counter, gauge }
        var source: String
        var name: String
        var labels: [(String, String)]
        var kind: Kind
        var help: String
    }

    /// What each `STATUS` name becomes. Names the store adds later without a mapping here are
    /// exported as gauges `kvtier_store_<name>` (see `refresh`).
    static let mappings: [Mapping] = [
        Mapping(source: "ram_pages", name: "kvtier_tier_pages", labels: [("tier", "ram")], kind: .gauge, help: "Pages held in the tier."),
        Mapping(source: "disk_pages", name: "kvtier_tier_pages", labels: [("tier", "disk")], kind: .gauge, help: "Pages held in the tier."),
        Mapping(source: "ram_bytes", name: "kvtier_tier_bytes", labels: [("tier", "ram")], kind: .gauge, help: "Bytes of pages held in the tier (disk: live record bytes)."),
        Mapping(source: "disk_live_bytes", name: "kvtier_tier_bytes", labels: [("tier", "disk")], kind: .gauge, help: "Bytes of pages held in the tier (disk: live record bytes)."),
        Mapping(source: "ram_budget_bytes", name: "kvtier_tier_budget_bytes", labels: [("tier", "ram")], kind: .gauge, help: "Configured budget of the tier."),
        Mapping(source: "disk_file_bytes", name: "kvtier_disk_file_bytes", labels: [], kind: .gauge, help: "Bytes of page files on disk, live and dead records."),
        Mapping(source: "lookup_hits_ram", name: "kvtier_lookup_hits_total", labels: [("tier", "ram")], kind: .counter, help: "Lookups that found cached tokens, by the slowest tier they needed."),
        Mapping(source: "lookup_hits_disk", name: "kvtier_lookup_hits_total", labels: [("tier", "disk")], kind: .counter, help: "Lookups that found cached tokens, by the slowest tier they needed."),
        Mapping(source: "lookup_misses", name: "kvtier_lookup_misses_total", labels: [], kind: .counter, help: "Lookups that found no cached token."),
        Mapping(source: "lookups", name: "kvtier_lookups_total", labels: [], kind: .counter, help: "Lookups served."),
        Mapping(source: "puts", name: "kvtier_puts_total", labels: [], kind: .counter, help: "PUT requests served."),
        Mapping(source: "gets", name: "kvtier_gets_total", labels: [], kind: .counter, help: "GET requests served."),
        Mapping(source: "pages_stored", name: "kvtier_pages_stored_total", labels: [], kind: .counter, help: "Pages written by PUTs."),
        Mapping(source: "pages_deduplicated", name: "kvtier_pages_deduplicated_total", labels: [], kind: .counter, help: "Pages a PUT found already stored."),
        Mapping(source: "promotions", name: "kvtier_promotions_total", labels: [], kind: .counter, help: "Pages read from disk back into RAM."),
        Mapping(source: "evictions", name: "kvtier_evictions_total", labels: [], kind: .counter, help: "Pages moved out of RAM over its budget."),
        Mapping(source: "puts_waited", name: "kvtier_puts_waited_total", labels: [], kind: .counter, help: "PUTs that waited for eviction because RAM had no room left."),
        Mapping(source: "evicting", name: "kvtier_evicting", labels: [], kind: .gauge, help: "1 while the background evictor runs."),
        Mapping(source: "server.requests.immediate", name: "kvtier_requests_immediate_total", labels: [], kind: .counter, help: "Requests answered on the connection's thread, without pending work."),
        Mapping(source: "disk_write_failures", name: "kvtier_disk_write_failures_total", labels: [], kind: .counter, help: "Pages that could not be written to disk."),
        Mapping(source: "disk_checksum_failures", name: "kvtier_checksum_failures_total", labels: [], kind: .counter, help: "Disk records whose checksum did not match (served as misses)."),
        Mapping(source: "leases", name: "kvtier_leases", labels: [], kind: .gauge, help: "Page leases held by clients."),
        Mapping(source: "models", name: "kvtier_models", labels: [], kind: .gauge, help: "Registered models."),
        Mapping(source: "tenants", name: "kvtier_tenants", labels: [], kind: .gauge, help: "Tenants with an arena."),
        Mapping(source: "sessions", name: "kvtier_sessions", labels: [], kind: .gauge, help: "Named sessions."),
        Mapping(source: "sessions_expired", name: "kvtier_sessions_expired_total", labels: [], kind: .counter, help: "Sessions deleted when their TTL ran out."),
        Mapping(source: "pinned_bytes", name: "kvtier_pinned_bytes", labels: [], kind: .gauge, help: "Bytes of pages held in RAM by pinned sessions."),
        Mapping(source: "prefetch_issued", name: "kvtier_prefetch_pages_total", labels: [("state", "issued")], kind: .counter, help: "Disk pages prefetch queued (issued), read into RAM (loaded), then served by a GET before leaving RAM (useful) or evicted unused (wasted)."),
        Mapping(source: "prefetch_loaded", name: "kvtier_prefetch_pages_total", labels: [("state", "loaded")], kind: .counter, help: "Disk pages prefetch queued (issued), read into RAM (loaded), then served by a GET before leaving RAM (useful) or evicted unused (wasted)."),
        Mapping(source: "prefetch_useful", name: "kvtier_prefetch_pages_total", labels: [("state", "useful")], kind: .counter, help: "Disk pages prefetch queued (issued), read into RAM (loaded), then served by a GET before leaving RAM (useful) or evicted unused (wasted)."),
        Mapping(source: "prefetch_late", name: "kvtier_prefetch_late_pages_total", labels: [], kind: .counter, help: "Pages a GET asked for while prefetch was still reading them: the GET waited for that read."),
        Mapping(source: "prefetch_wasted", name: "kvtier_prefetch_pages_total", labels: [("state", "wasted")], kind: .counter, help: "Disk pages prefetch queued (issued), read into RAM (loaded), then served by a GET before leaving RAM (useful) or evicted unused (wasted)."),
        Mapping(source: "codec_measurements", name: "kvtier_codec_measurements_total", labels: [], kind: .counter, help: "Samples the codec policy measured (first choices and checks)."),
        Mapping(source: "codec_choices", name: "kvtier_codec_choices_total", labels: [], kind: .counter, help: "Models (per tenant) the codec policy chose a disk codec for."),
        Mapping(source: "codec_checks", name: "kvtier_codec_checks_total", labels: [], kind: .counter, help: "Later samples measured with the codec in force."),
        Mapping(source: "codec_fallbacks", name: "kvtier_codec_fallbacks_total", labels: [], kind: .counter, help: "Checks past the bound that moved a model's new pages to a safer codec."),
        Mapping(source: "server.connections.open", name: "kvtier_clients", labels: [], kind: .gauge, help: "Client connections open."),
        Mapping(source: "server.connections.accepted", name: "kvtier_connections_accepted_total", labels: [], kind: .counter, help: "Client connections accepted."),
        Mapping(source: "server.connections.rejected", name: "kvtier_connections_rejected_total", labels: [], kind: .counter, help: "Client connections refused (limit or handshake)."),
        Mapping(source: "server.frames.received", name: "kvtier_frames_received_total", labels: [], kind: .counter, help: "Protocol frames received."),
        Mapping(source: "server.errors.protocol", name: "kvtier_protocol_errors_total", labels: [], kind: .counter, help: "Connections closed for a protocol error."),
        Mapping(source: "server.errors.frame_timeout", name: "kvtier_frame_timeouts_total", labels: [], kind: .counter, help: "Connections closed because a frame did not arrive in time."),
        Mapping(source: "server.requests.handled", name: "kvtier_requests_total", labels: [], kind: .counter, help: "Requests answered by the store."),
        // The remote tier (present only with remoteURL).
        Mapping(source: "remote_pages", name: "kvtier_tier_pages", labels: [("tier", "remote")], kind: .gauge, help: "Pages held in the tier."),
        Mapping(source: "remote_bytes", name: "kvtier_tier_bytes", labels: [("tier", "remote")], kind: .gauge, help: "Bytes of pages held in the tier (disk: live record bytes)."),
        Mapping(source: "remote_budget_bytes", name: "kvtier_tier_budget_bytes", labels: [("tier", "remote")], kind: .gauge, help: "Configured budget of the tier."),
        Mapping(source: "lookup_hits_remote", name: "kvtier_lookup_hits_total", labels: [("tier", "remote")], kind: .counter, help: "Lookups that found cached tokens, by the slowest tier they needed."),
        Mapping(source: "remote_up", name: "kvtier_remote_up", labels: [], kind: .gauge, help: "1 while the remote tier answers, 0 while it is down (misses served, retried with back-off)."),
        Mapping(source: "remote_promotions", name: "kvtier_remote_promotions_total", labels: [], kind: .counter, help: "Pages fetched from the remote tier, verified and promoted to RAM."),
        Mapping(source: "remote_rejected", name: "kvtier_remote_rejected_total", labels: [], kind: .counter, help: "Remote values refused (MAC, page, model or checksum mismatch): served as misses."),
        Mapping(source: "remote_writes", name: "kvtier_remote_writes_total", labels: [], kind: .counter, help: "Pages written to the remote tier."),
        Mapping(source: "remote_writes_dropped", name: "kvtier_remote_writes_dropped_total", labels: [], kind: .counter, help: "Remote copies dropped: queue full or remote tier down."),
        Mapping(source: "remote_write_errors", name: "kvtier_remote_write_errors_total", labels: [], kind: .counter, help: "Page writes the remote server refused (full, read-only, ACL)."),
        Mapping(source: "remote_failures", name: "kvtier_remote_failures_total", labels: [], kind: .counter, help: "Remote requests that failed (timeout, connection lost, protocol violation)."),
        Mapping(source: "remote_reconnects", name: "kvtier_remote_reconnects_total", labels: [], kind: .counter, help: "Times the remote tier came back after being down."),
        Mapping(source: "remote_queue_bytes", name: "kvtier_remote_queue_bytes", labels: [], kind: .gauge, help: "Bytes of page records waiting to be written to the remote tier."),
        Mapping(source: "remote_fetch_bytes", name: "kvtier_remote_fetch_bytes_total", labels: [], kind: .counter, help: "Bytes of values fetched from the remote tier."),
        // The VRAM tier's directory (VramDirectory.status).
        Mapping(source: "vram_pools", name: "kvtier_vram_pools", labels: [], kind: .gauge, help: "VRAM pools registered by clients."),
        Mapping(source: "vram_slots", name: "kvtier_vram_slots", labels: [("state", "all")], kind: .gauge, help: "Slots of the VRAM pools: all, resident (visible to readers) and writing (reserved by a placement)."),
        Mapping(source: "vram_resident_slots", name: "kvtier_vram_slots", labels: [("state", "resident")], kind: .gauge, help: "Slots of the VRAM pools: all, resident (visible to readers) and writing (reserved by a placement)."),
        Mapping(source: "vram_writing_slots", name: "kvtier_vram_slots", labels: [("state", "writing")], kind: .gauge, help: "Slots of the VRAM pools: all, resident (visible to readers) and writing (reserved by a placement)."),
        Mapping(source: "vram_leases", name: "kvtier_vram_leases", labels: [], kind: .gauge, help: "VRAM_PLACE and VRAM_LEASE leases held by clients."),
        Mapping(source: "vram_placements", name: "kvtier_vram_placements_total", labels: [], kind: .counter, help: "VRAM_PLACE requests that had pages to place."),
        Mapping(source: "vram_placed_slots", name: "kvtier_vram_placed_slots_total", labels: [], kind: .counter, help: "Slots VRAM_PLACE reserved."),
        Mapping(source: "vram_commits", name: "kvtier_vram_commits_total", labels: [], kind: .counter, help: "Placements committed (their slots became resident)."),
        Mapping(source: "vram_evictions", name: "kvtier_vram_evictions_total", labels: [], kind: .counter, help: "Resident VRAM slots evicted to make room for a placement."),
        Mapping(source: "vram_lease_hits", name: "kvtier_vram_leases_total", labels: [("result", "hit")], kind: .counter, help: "VRAM_LEASE requests, by whether a pool held the prefix's first page."),
        Mapping(source: "vram_lease_misses", name: "kvtier_vram_leases_total", labels: [("result", "miss")], kind: .counter, help: "VRAM_LEASE requests, by whether a pool held the prefix's first page."),
    ]

    private enum Exported {
        case counter(Prometheus.Counter)
        case gauge(Prometheus.Gauge)
    }

    private struct State {
        var exported: [String: Exported] = [:]
        /// Last value copied into each counter, so a scrape adds only the difference.
        var lastCounterValues: [String: UInt64] = [:]
        var timers: [UInt16: CoreMetrics.Timer] = [:]
    }

    private let state = Mutex(State())
    /// Per tenant and model: the codec policy's measured attention error and bits per element.
    private let codecGauges = Mutex<[String: (error: Prometheus.Gauge, bits: Prometheus.Gauge)]>([:])
    private let tierBudget: Prometheus.Gauge
    private let ioPath: [String: Prometheus.Gauge]
    private let startTime: Prometheus.Gauge
    /// Prefetched pages a GET used over pages prefetch issued (`prefetch_useful` / `prefetch_issued`).
    private let prefetchAccuracy: Prometheus.Gauge

    /// `ioPath`: "io_uring" or "pread", the disk tier's read path; `diskBudgetBytes` when set.
    public init(ioPath currentPath: String, diskBudgetBytes: Int?, startTimeSeconds: Double) {
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.durationHistogramBuckets[Self.requestDurationName] = Self.latencyBuckets
        for name in [DiskMetricsObserver.readName, DiskMetricsObserver.codecName, DiskMetricsObserver.commitName] {
            factory.durationHistogramBuckets[name] = DiskMetricsObserver.buckets
        }
        self.factory = factory
        tierBudget = registry.makeGauge(
            descriptor: MetricNameDescriptor(metricName: "kvtier_tier_budget", unitName: "bytes", helpText: "Configured budget of the tier."),
            labels: [("tier", "disk")])
        tierBudget.set(Double(diskBudgetBytes ?? 0))
        var paths: [String: Prometheus.Gauge] = [:]
        for path in ["io_uring", "pread"] {
            paths[path] = registry.makeGauge(
                descriptor: MetricNameDescriptor(metricName: "kvtier_io_path", unitName: "", helpText: "1 for the disk tier's read path (io_uring, or the pread fallback), else 0."),
                labels: [("path", path)])
            paths[path]!.set(to: path == currentPath ? 1.0 : 0.0)
        }
        ioPath = paths
        startTime = registry.makeGauge(
            descriptor: MetricNameDescriptor(metricName: "kvtier_start_time", unitName: "seconds", helpText: "When kvtierd started, seconds since the Unix epoch."))
        startTime.set(startTimeSeconds)
        prefetchAccuracy = registry.makeGauge(
            descriptor: MetricNameDescriptor(metricName: "kvtier_prefetch_accuracy", unitName: "ratio",
                                             helpText: "Prefetched pages a GET used before they left RAM, over pages prefetch issued (0 before any)."))
        state.withLock { s in
            for mapping in Self.mappings { s.exported[mapping.source] = Self.make(mapping, in: registry) }
            // STATUS carries the disk budget when there is one: the same gauge, not a second one.
            s.exported["disk_budget_bytes"] = .gauge(tierBudget)
        }
    }

    private static func make(_ mapping: Mapping, in registry: PrometheusCollectorRegistry) -> Exported {
        let descriptor = MetricNameDescriptor(metricName: mapping.name, unitName: "", helpText: mapping.help)
        switch mapping.kind {
        case .counter: return .counter(registry.makeCounter(descriptor: descriptor, labels: mapping.labels))
        case .gauge: return .gauge(registry.makeGauge(descriptor: descriptor, labels: mapping.labels))
        }
    }

    /// The latency timer of requests with `opcode` (named by `name`), created on first use.
    public func timer(opcode: UInt16, name: String) -> CoreMetrics.Timer {
        if let timer = state.withLock({ $0.timers[opcode] }) { return timer }
        let timer = CoreMetrics.Timer(label: Self.requestDurationName, dimensions: [("opcode", name)], factory: factory)
        return state.withLock { s in
            if let existing = s.timers[opcode] { return existing }
            s.timers[opcode] = timer
            return timer
        }
    }

    /// What the disk tier reports its timings to.
    public func diskObserver() -> any DiskTierObserver {
        DiskMetricsObserver(factory: factory)
    }

    /// Copies `counters` (store status and server counters, by their `STATUS` names) into the
    /// metrics. Unknown names become gauges `kvtier_store_<name>`.
    public func refresh(_ counters: [(name: String, value: UInt64)]) {
        let issued = counters.first { $0.name == "prefetch_issued" }?.value ?? 0
        let used = counters.first { $0.name == "prefetch_useful" }?.value ?? 0
        prefetchAccuracy.set(issued == 0 ? 0 : Double(used) / Double(issued))
        state.withLock { s in
            for (name, value) in counters {
                let exported: Exported
                if let existing = s.exported[name] {
                    exported = existing
                } else {
                    let mapping = Mapping(source: name, name: "kvtier_store_" + Self.sanitized(name), labels: [], kind: .gauge,
                                          help: "Store status value '\(name)'.")
                    exported = Self.make(mapping, in: registry)
                    s.exported[name] = exported
                }
                switch exported {
                case .gauge(let gauge):
                    gauge.set(Double(value))
                case .counter(let counter):
                    let last = s.lastCounterValues[name] ?? 0
                    if value >= last {
                        if value > last { counter.increment(by: Int64(clamping: value - last)) }
                    } else {
                        counter.reset()  // The source restarted from zero.
                        counter.increment(by: Int64(clamping: value))
                    }
                    s.lastCounterValues[name] = value
                }
            }
        }
    }

    /// The codec policy's decision for each tenant's model: `kvtier_codec_attention_error` (as
    /// measured when the codec in force was chosen; -1 before) and `kvtier_codec_bits_per_element`
    /// of that codec, labelled `tenant` and `model` (hex id). A series stays once made: a model's
    /// choice only changes, it never goes away while the daemon runs.
    public func refreshCodecs(_ choices: [(tenant: TenantID, choice: CodecPolicy.Choice, bitsPerElement: Double)]) {
        codecGauges.withLock { gauges in
            for (tenant, choice, bits) in choices {
                let labels = [("tenant", "\(tenant)"), ("model", PageKey.hex(choice.modelID))]
                let key = "\(tenant)/\(choice.modelID)"
                let pair = gauges[key] ?? (
                    registry.makeGauge(descriptor: MetricNameDescriptor(metricName: "kvtier_codec_attention_error", unitName: "",
                                                                        helpText: "Attention-output error the codec policy measured for the disk codec in force (a fraction; -1: not measured yet)."),
                                       labels: labels),
                    registry.makeGauge(descriptor: MetricNameDescriptor(metricName: "kvtier_codec_bits_per_element", unitName: "",
                                                                        helpText: "Bits per element of the disk codec the codec policy writes the model's new pages with."),
                                       labels: labels))
                gauges[key] = pair
                pair.error.set(choice.attentionError ?? -1)
                pair.bits.set(bits)
            }
        }
    }

    /// The text exposition (format 0.0.4) of every metric.
    public func exposition() -> [UInt8] {
        registry.emitToBuffer()
    }

    /// A metric name part: letters, digits and underscores only.
    static func sanitized(_ name: String) -> String {
        String(name.map { $0.isASCII && ($0.isLetter || $0.isNumber) ? $0 : "_" })
    }
}
