#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import Dispatch
import KVTierCore
import KVTierIO
import KVTierRemote
import KVTierServer
import KVTierStore
import Logging
import Synchronization

/// kvtierd assembled: the disk tier on the state directory, the tiered store with one shared
/// arena per tenant, and the Unix-socket server in front. `run` returns after SIGTERM or SIGINT:
/// stop accepting, finish in-flight requests, write RAM pages to disk, sync the disk tier, exit.
public final class Daemon: Sendable {
    public let configuration: DaemonConfiguration.Resolved
    let logger: Logger
    /// Re-reads the configuration on SIGHUP (file and flags); nil: SIGHUP only logs.
    let reload: (@Sendable () throws -> DaemonConfiguration.Resolved)?
    /// The level SIGHUP changes when `logLevel` changed.
    let logLevel: LogLevelSwitch?

    public init(configuration: DaemonConfiguration.Resolved, logger: Logger,
                reload: (@Sendable () throws -> DaemonConfiguration.Resolved)? = nil, logLevel: LogLevelSwitch? = nil) {
        self.configuration = configuration
        self.logger = logger
        self.reload = reload
        self.logLevel = logLevel
    }

    /// The longest a clean stop spends writing RAM pages to disk (systemd's default stop timeout
    /// is 90 s).
    static let shutdownFlushSeconds = 60
    /// The longest a clean stop waits for queued remote writes.
    static let remoteDrainMillis = 2_000
    /// Allocations at least this large are mmapped and returned on free (mallopt M_MMAP_THRESHOLD).
    static let mmapThresholdBytes: Int32 = 1 << 20

    /// mallopt(M_MMAP_THRESHOLD, mmapThresholdBytes); Swift's Glibc module leaves malloc.h out,
    /// so the call is looked up at run time. Setting it also stops glibc's dynamic raising.
    static func fixMmapThreshold() {
        typealias Mallopt = @convention(c) (Int32, Int32) -> Int32
        let mmapThresholdParameter: Int32 = -3  // M_MMAP_THRESHOLD
        guard let symbol = dlsym(nil, "mallopt") else { return }
        _ = unsafeBitCast(symbol, to: Mallopt.self)(mmapThresholdParameter, mmapThresholdBytes)
    }

    public func run() async throws {
        let c = configuration
        // SIGTERM/SIGINT are caught from here on, before READY=1 can be sent: one that arrives
        // while starting stops the server as soon as it exists (`StopRequest`).
        let stop = StopRequest()
        let logger = self.logger
        let signals = SignalWatcher(signals: [SIGTERM, SIGINT]) { signal in
            logger.info("stopping on signal", metadata: ["signal": "\(signal)"])
            stop.request()
        }
        defer { signals.cancel() }
        // Buffers of 1 MiB and more (large frames and replies) get mappings of their own, which
        // go back to the kernel when freed. glibc's default threshold rises after each such
        // free, after which freed frame buffers stayed in the heap: RSS stayed high long after
        // stalled clients were gone.
        Self.fixMmapThreshold()
        // The remote tier's secrets first: a missing key stops the daemon before it opens anything.
        let remoteSecrets = try c.remote?.secrets(environment: KVTierPaths.currentEnvironment())
        let selection = try BlockReaders.make(queueDepth: c.ioQueueDepth, logger: logger)
        defer { selection.reader.close() }
        let operations = try DaemonOperations(configuration: c, ioPath: selection.reader.path, reload: reload, logLevel: logLevel, logger: logger)
        operations.notifier.status("recovering the disk tier")
        // The state directory (and every directory created for it) must be ours and writable by
        // no one else: another user who made it first could read the catalog or plant links.
        try DirectoryTrust.prepare(c.stateDir, mode: 0o750)
        let storage = PosixStorage(root: c.stateDir, reader: selection.reader, logger: logger)
        var diskConfiguration = DiskTierConfiguration()
        diskConfiguration.budgetBytes = c.diskBudgetBytes
        diskConfiguration.tenantBudgetBytes = c.diskTenantQuotaBytes
        let disk = try DiskTier(storage: storage, configuration: diskConfiguration, logger: logger)
        if let metrics = operations.metrics { disk.observe(with: metrics.diskObserver()) }
        let catalog = try SessionCatalog(storage: storage, logger: logger)
        var remote: (tier: RedisRemoteTier, attachment: RemoteAttachment)?
        if let settings = c.remote, let secrets = remoteSecrets {
            let tier = try RedisRemoteTier(configuration: settings.tierConfiguration(key: secrets.key, password: secrets.password), logger: logger)
            remote = (tier, RemoteAttachment(tier: tier, key: secrets.key, pages: settings.pages))
            if settings.pages == .evicted, c.diskBudgetBytes == nil, c.diskTenantQuotaBytes == nil {
                logger.warning("remotePages is evicted but no diskBudget or diskTenantQuota is set: the disk never deletes a page, so none is sent to the remote tier (other hosts' pages are still found there); set diskBudget, or remotePages durable or all")
            }
            // A remote tier that does not answer yet is no reason not to serve: it is retried.
            if tier.probe() {
                logger.info("remote tier reachable", metadata: ["url": "\(settings.url)", "pages": "\(settings.pages.rawValue)"])
            } else {
                logger.warning("remote tier unreachable at start; serving local tiers and retrying", metadata: [
                    "url": "\(settings.url)", "error": "\(tier.lastError)"])
            }
        }

        var storeConfiguration = TieredStore.Configuration()
        storeConfiguration.ramBudgetBytes = c.ramBudgetBytes
        storeConfiguration.tenantRAMQuotaBytes = c.tenantRAMQuotaBytes
        storeConfiguration.evictionHeadroomBytes = c.evictionHeadroomBytes
        storeConfiguration.stagingBytes = c.stagingBytes
        // The page arena never gives memory back (docs/security.md): sized to the quota.
        storeConfiguration.arenaBytes = TieredStore.pageArenaBytes(quota: c.tenantRAMQuotaBytes, ceiling: c.arenaBytes)
        storeConfiguration.diskCodec = c.diskCodec
        storeConfiguration.codecPolicy = c.codecPolicy
        let arenaBytes = storeConfiguration.arenaBytes, stagingBytes = c.stagingBytes
        storeConfiguration.maxModelsPerTenant = c.maxModelsPerTenant
        let store = TieredStore(configuration: storeConfiguration, disk: disk, catalog: catalog, remote: remote?.attachment,
                                logger: logger) { tenant in
            try ArenaPageMemory(name: "kvtier-arena-\(tenant)", capacity: arenaBytes, stagingCapacity: stagingBytes, logger: logger)
        }

        // The socket's directory likewise, unless systemd passes the socket (its RuntimeDirectory
        // is made by systemd). 0755: every local user must reach the socket.
        if SystemdListenDescriptors.passed(environment: KVTierPaths.currentEnvironment()).isEmpty {
            let slash = c.socket.lastIndex(of: "/")
            let socketDirectory = slash.map { String(c.socket[..<$0]) } ?? "."
            try DirectoryTrust.prepare(socketDirectory.isEmpty ? "/" : socketDirectory, mode: 0o755)
        }
        let listener = try operations.makeListener(socketPath: c.socket)
        // The VRAM tier's directory: pools of GPU memory in clients (docs/vram-tier.md).
        let vram = VramDirectory(heatHalfLifeMicros: store.heatHalfLifeMicros)
        let server = KVServer(
            listener: listener, handler: operations.instrument(StoreRequestHandler(store: store, defaultPageTokens: c.pageTokens, vram: vram)),
            configuration: c.transport.serverConfiguration,
            tenantFor: { peer in c.tenant(uid: peer.uid, gid: peer.gid) },
            arenaProvider: { tenant in
                let memory = try store.memory(for: tenant)
                guard let pages = memory.shareableDescriptor, let staging = memory.stagingDescriptor else { return nil }
                return KVServer.TenantArenas(pages: (pages, memory.capacity), staging: (staging, memory.stagingCapacity))
            },
            logger: logger)

        stop.whenRequested {
            operations.stopping()
            server.shutdown()
        }
        logger.info("kvtierd ready", metadata: [
            "socket": "\(listener.path ?? "passed by systemd")", "stateDir": "\(c.stateDir)", "ramBudget": "\(ByteCount(c.ramBudgetBytes))",
            "diskCodec": "\(c.diskCodec)", "diskPages": "\(disk.stats.pages)", "sessions": "\(catalog.count)", "ioPath": "\(storage.readPath)",
            "remote": "\(c.remote.map { "\($0.url) (\($0.pages.rawValue))" } ?? "off")",
        ])
        // Sessions past their TTL are forgotten within a few seconds.
        let expiry = Task.detached {
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(5))
                store.expireSessions()
            }
        }
        operations.started(store: store, vram: vram, server: server, status: "serving \(disk.stats.pages) disk pages, \(catalog.count) sessions; io \(storage.readPath)")
        try await server.run()
        expiry.cancel()
        // A clean stop keeps the whole cache: RAM pages go to disk (hottest first, for at most
        // `shutdownFlushSeconds`), so the next start serves them.
        let flushed = await store.persistResident(deadlineMicros: Clocks.monotonicMicros() + UInt64(Self.shutdownFlushSeconds) * 1_000_000)
        if flushed.written > 0 || flushed.left > 0 {
            logger.info("RAM pages written to disk for the next start", metadata: ["pages": "\(flushed.written)", "leftUnwritten": "\(flushed.left)"])
        }
        await disk.close()
        // What the flush queued for the remote tier goes out for a moment more, then the rest is dropped.
        remote?.tier.shutdown(drainMillis: Self.remoteDrainMillis)
        logger.info("kvtierd stopped")
    }
}

/// A stop asked for by a signal, possibly before there is a server to stop: the action runs
/// once, when both the request and the action are there.
final class StopRequest: Sendable {
    private struct State {
        var requested = false
        var action: (@Sendable () -> Void)?
    }
    private let state = Mutex(State())

    func request() {
        let action = state.withLock { state -> (@Sendable () -> Void)? in
            state.requested = true
            defer { state.action = nil }
            return state.action
        }
        action?()
    }

    func whenRequested(_ action: @escaping @Sendable () -> Void) {
        let runNow = state.withLock { state -> Bool in
            if state.requested { return true }
            state.action = action
            return false
        }
        if runNow { action() }
    }
}
