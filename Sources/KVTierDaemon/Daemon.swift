#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import Dispatch
import KVTierCore
import KVTierIO
import KVTierServer
import KVTierStore
import Logging

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

    public func run() async throws {
        let c = configuration
        let selection = try BlockReaders.make(queueDepth: c.ioQueueDepth, logger: logger)
        defer { selection.reader.close() }
        let operations = try DaemonOperations(configuration: c, ioPath: selection.reader.path, reload: reload, logLevel: logLevel, logger: logger)
        operations.notifier.status("recovering the disk tier")
        let storage = PosixStorage(root: c.stateDir, reader: selection.reader, logger: logger)
        try storage.makeDirectory("")
        var diskConfiguration = DiskTierConfiguration()
        diskConfiguration.budgetBytes = c.diskBudgetBytes
        let disk = try DiskTier(storage: storage, configuration: diskConfiguration, logger: logger)
        if let metrics = operations.metrics { disk.observe(with: metrics.diskObserver()) }
        let catalog = try SessionCatalog(storage: storage, logger: logger)

        var storeConfiguration = TieredStore.Configuration()
        storeConfiguration.ramBudgetBytes = c.ramBudgetBytes
        storeConfiguration.arenaBytes = c.arenaBytes
        storeConfiguration.diskCodec = c.diskCodec
        storeConfiguration.maxModelsPerTenant = c.maxModelsPerTenant
        let arenaBytes = c.arenaBytes
        let logger = self.logger
        let store = TieredStore(configuration: storeConfiguration, disk: disk, catalog: catalog, logger: logger) { tenant in
            try ArenaPageMemory(name: "kvtier-arena-\(tenant)", capacity: arenaBytes, logger: logger)
        }

        let socketDirectory = String(c.socket[..<(c.socket.lastIndex(of: "/") ?? c.socket.startIndex)])
        if !socketDirectory.isEmpty { try? PosixStorage(root: "/", reader: selection.reader, logger: logger).makeDirectory(socketDirectory) }
        let listener = try operations.makeListener(socketPath: c.socket)
        let server = KVServer(
            listener: listener, handler: operations.instrument(StoreRequestHandler(store: store, defaultPageTokens: c.pageTokens)),
            tenantFor: { peer in c.tenant(uid: peer.uid, gid: peer.gid) },
            arenaProvider: { tenant in
                let memory = try store.memory(for: tenant)
                guard let descriptor = memory.shareableDescriptor else { return nil }
                return (descriptor, memory.capacity)
            },
            logger: logger)

        let signals = SignalWatcher(signals: [SIGTERM, SIGINT]) { signal in
            logger.info("stopping on signal", metadata: ["signal": "\(signal)"])
            operations.stopping()
            server.shutdown()
        }
        defer { signals.cancel() }
        logger.info("kvtierd ready", metadata: [
            "socket": "\(listener.path ?? "passed by systemd")", "stateDir": "\(c.stateDir)", "ramBudget": "\(ByteCount(c.ramBudgetBytes))",
            "diskCodec": "\(c.diskCodec)", "diskPages": "\(disk.stats.pages)", "sessions": "\(catalog.count)", "ioPath": "\(storage.readPath)",
        ])
        // Sessions past their TTL are forgotten within a few seconds.
        let expiry = Task.detached {
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(5))
                store.expireSessions()
            }
        }
        operations.started(store: store, server: server, status: "serving \(disk.stats.pages) disk pages, \(catalog.count) sessions; io \(storage.readPath)")
        try await server.run()
        expiry.cancel()
        // A clean stop keeps the whole cache: RAM pages go to disk (hottest first, for at most
        // `shutdownFlushSeconds`), so the next start serves them.
        let flushed = await store.persistResident(deadlineMicros: Clocks.monotonicMicros() + UInt64(Self.shutdownFlushSeconds) * 1_000_000)
        if flushed.written > 0 || flushed.left > 0 {
            logger.info("RAM pages written to disk for the next start", metadata: ["pages": "\(flushed.written)", "leftUnwritten": "\(flushed.left)"])
        }
        await disk.close()
        logger.info("kvtierd stopped")
    }
}

/// Turns signals into a callback on a dispatch queue (the signals are ignored by the process
/// default handler while watched).
final class SignalWatcher: @unchecked Sendable {
    // Invariant: `sources` is written only in init and cancel, both on the creating thread.
    private var sources: [DispatchSourceSignal] = []

    init(signals: [Int32], handler: @escaping @Sendable (Int32) -> Void) {
        for number in signals {
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler { handler(number) }
            source.resume()
            sources.append(source)
        }
    }

    func cancel() {
        for source in sources { source.cancel() }
        sources.removeAll()
    }
}
