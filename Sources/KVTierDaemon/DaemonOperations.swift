#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import KVTierCore
import KVTierIO
import KVTierServer
import KVTierStore
import Logging
import Synchronization

/// What an operator sees of kvtierd, kept apart from the store wiring in `Daemon`: systemd
/// (socket activation, sd_notify, watchdog), the Prometheus endpoint, and SIGHUP reloads.
final class DaemonOperations: Sendable {
    let notifier: SystemdNotifier
    let metrics: DaemonMetrics?
    let metricsServer: MetricsHTTPServer?
    private let logger: Logger
    private let environment: [String: String]
    private let reloader: Mutex<Reloader>
    private let hangups = Mutex<SignalWatcher?>(nil)

    /// What SIGHUP re-reads and applies.
    struct Reloader {
        var current: DaemonConfiguration.Resolved
        var load: (@Sendable () throws -> DaemonConfiguration.Resolved)?
        var logLevel: LogLevelSwitch?
    }

    init(configuration: DaemonConfiguration.Resolved, ioPath: IOPath, reload: (@Sendable () throws -> DaemonConfiguration.Resolved)?,
         logLevel: LogLevelSwitch?, logger: Logger, environment: [String: String] = KVTierPaths.currentEnvironment()) throws {
        self.logger = logger
        self.environment = environment
        notifier = SystemdNotifier(environment: environment, logger: logger)
        reloader = Mutex(Reloader(current: configuration, load: reload, logLevel: logLevel))
        if let endpoint = configuration.metricsListen {
            let path: String
            switch ioPath {
            case .ioUring: path = "io_uring"
            case .preadPool: path = "pread"
            }
            metrics = DaemonMetrics(ioPath: path, diskBudgetBytes: configuration.diskBudgetBytes,
                                    startTimeSeconds: Double(Clocks.wallMicros()) / 1e6)
            metricsServer = try MetricsHTTPServer(endpoint: endpoint, logger: logger)
        } else {
            metrics = nil
            metricsServer = nil
        }
    }

    /// The socket systemd passed (`LISTEN_FDS`), else one bound at `socketPath`.
    func makeListener(socketPath: String) throws -> UnixListener {
        let passed = SystemdListenDescriptors.passed(environment: environment)
        SystemdListenDescriptors.unsetEnvironment()
        guard let first = passed.first else { return try UnixListener(path: socketPath) }
        if passed.count > 1 {
            logger.warning("systemd passed several sockets; serving the first", metadata: ["count": "\(passed.count)"])
        }
        let listener = try UnixListener(adopting: first)
        logger.info("serving the socket passed by systemd", metadata: ["descriptor": "\(first)"])
        return listener
    }

    /// `handler`, timed into the request latency histogram when metrics are on.
    func instrument(_ handler: any RequestHandler) -> any RequestHandler {
        guard let metrics else { return handler }
        return TimedRequestHandler(handler, metrics: metrics)
    }

    /// The daemon accepts connections: start the metrics endpoint, SIGHUP handling and the
    /// watchdog, and tell systemd READY=1.
    func started(store: TieredStore, vram: VramDirectory, server: KVServer, status: String) {
        if let metrics, let metricsServer {
            metricsServer.start {
                metrics.refresh(store.status() + vram.status() + server.counters.snapshot().map { ($0.name, $0.value) })
                metrics.refreshCodecs(store.codecPolicy.everyChoice())
                return metrics.exposition()
            }
            logger.info("metrics listening", metadata: [
                "address": "\(metricsServer.endpoint.host)", "port": "\(metricsServer.boundPort)",
            ])
        }
        let watcher = SignalWatcher(signals: [SIGHUP]) { [self] _ in reload() }
        hangups.withLock { $0 = watcher }
        // A ping needs the accept loop to have answered the previous probe (KVServer.livenessProbe):
        // proof the daemon still takes connections, without waiting on the store's lock behind
        // requests (a long locked request would otherwise get a live daemon killed by systemd).
        notifier.startWatchdog { server.livenessProbe() }
        notifier.ready(status: status)
    }

    /// SIGTERM or SIGINT arrived.
    func stopping() {
        notifier.stopping(status: "stopping: finishing requests, syncing the disk tier")
        notifier.stopWatchdog()
        hangups.withLock { watcher in
            watcher?.cancel()
            watcher = nil
        }
        metricsServer?.stop()
    }

    /// Re-reads the configuration; applies `DaemonConfiguration.reloadableKeys` and logs every
    /// other changed key as waiting for a restart. A configuration that no longer validates is
    /// logged and ignored: the daemon keeps running with what it has.
    func reload() {
        notifier.reloading()
        defer { notifier.ready(status: "serving (configuration reloaded)") }
        reloader.withLock { r in
            guard let load = r.load else {
                logger.notice("SIGHUP: nothing to reload (no configuration source)")
                return
            }
            let next: DaemonConfiguration.Resolved
            do { next = try load() } catch {
                logger.error("SIGHUP: configuration rejected, keeping the running one", metadata: ["error": "\(error)"])
                return
            }
            let changed = next.changedKeys(comparedTo: r.current)
            let applied = changed.filter { DaemonConfiguration.reloadableKeys.contains($0) }
            let pending = changed.filter { !DaemonConfiguration.reloadableKeys.contains($0) }
            if applied.contains("logLevel"), let levels = r.logLevel {
                levels.level = next.logLevel
                r.current.logLevel = next.logLevel
            }
            logger.notice("SIGHUP: configuration reloaded", metadata: [
                "applied": "\(applied.joined(separator: ","))", "needRestart": "\(pending.joined(separator: ","))",
                "logLevel": "\(r.current.logLevel)",
            ])
        }
    }
}
