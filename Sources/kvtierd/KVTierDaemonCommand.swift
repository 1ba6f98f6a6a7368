import ArgumentParser
import KVTierBuildInfo
import KVTierCore
import KVTierDaemon
import Logging

@main
struct KVTierDaemonCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kvtierd",
        abstract: "The KVTier daemon: a tiered KV-cache shared by the inference processes of this host.",
        discussion: """
            Runs with embedded defaults; a JSON --config file and these flags override them (flags win); \
            every key is in docs/configuration.md. SIGHUP re-reads the configuration and applies logLevel. \
            Under systemd it serves a socket passed by socket activation (LISTEN_FDS) and reports \
            READY, STATUS, WATCHDOG and STOPPING to NOTIFY_SOCKET (systemd/kvtierd.service).
            """,
        version: BuildInfo.version)

    @Option(help: "Unix socket to listen on, unless systemd passes one (default: $XDG_RUNTIME_DIR/kvtier/kvtierd.sock; as root /run/kvtier/kvtierd.sock; else under the state directory).")
    var socket: String?
    @Option(name: .customLong("state-dir"), help: "Where page files live (default: $XDG_STATE_HOME/kvtier, or /var/lib/kvtier as root).")
    var stateDir: String?
    @Option(name: .customLong("ram-budget"), help: "Most bytes of pages in RAM, e.g. 512MiB, 8GiB (default 1GiB).")
    var ramBudget: String?
    @Option(name: .customLong("disk-budget"), help: "Most bytes of page files on disk (default: no limit).")
    var diskBudget: String?
    @Option(name: .customLong("disk-codec"), help: "Codec of pages written to disk, e.g. k4v4, tq3m, fp16+zstd (default k4v4).")
    var diskCodec: String?
    @Option(help: "JSON configuration file (keys: \(DaemonConfiguration.keys.joined(separator: ", ")); docs/configuration.md).")
    var config: String?
    @Flag(name: .customLong("print-config"), help: "Print the effective configuration as JSON and exit.")
    var printConfig = false
    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical (default info; SIGHUP reloads it from --config).")
    var logLevel: String?
    @Option(name: .customLong("metrics-listen"), help: "HOST:PORT for Prometheus text on GET /metrics, e.g. 127.0.0.1:9464 (default: off; loopback only unless metricsAllowNonLoopback).")
    var metricsListen: String?

    /// Defaults, then the config file, then flags; re-run on SIGHUP.
    static func effectiveConfiguration(file: String?, overrides: DaemonConfiguration.Overrides) throws -> DaemonConfiguration.Resolved {
        var settings = DaemonConfiguration()
        if let file { settings = try DaemonConfiguration.load(file: file) }
        overrides.apply(to: &settings)
        return try settings.resolved()
    }

    func run() async throws {
        let overrides = DaemonConfiguration.Overrides(
            socket: socket, stateDir: stateDir, ramBudget: ramBudget, diskBudget: diskBudget, diskCodec: diskCodec,
            logLevel: logLevel, metricsListen: metricsListen)
        let file = config
        let resolved: DaemonConfiguration.Resolved
        do { resolved = try Self.effectiveConfiguration(file: file, overrides: overrides) } catch { throw ValidationError("\(error)") }
        if printConfig {
            print(resolved.json)
            return
        }
        let levels = LogLevelSwitch(resolved.logLevel)
        LoggingSystem.bootstrap { label in levels.makeHandler(StreamLogHandler.standardError(label: label)) }
        try await Daemon(
            configuration: resolved, logger: Logger(label: "kvtierd"),
            reload: { try Self.effectiveConfiguration(file: file, overrides: overrides) }, logLevel: levels
        ).run()
    }
}
