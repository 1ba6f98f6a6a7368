import ArgumentParser
import KVTierCore
import KVTierDaemon
import Logging

@main
struct KVTierDaemonCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kvtierd",
        abstract: "The KVTier daemon: a tiered KV-cache shared by the inference processes of this host.",
        discussion: "Runs with embedded defaults; a JSON --config file and these flags override them (flags win).")

    @Option(help: "Unix socket to listen on (default: $XDG_RUNTIME_DIR/kvtier/kvtierd.sock, else under the state directory).")
    var socket: String?
    @Option(name: .customLong("state-dir"), help: "Where page files live (default: $XDG_STATE_HOME/kvtier, or /var/lib/kvtier as root).")
    var stateDir: String?
    @Option(name: .customLong("ram-budget"), help: "Most bytes of pages in RAM, e.g. 512MiB, 8GiB (default 1GiB).")
    var ramBudget: String?
    @Option(name: .customLong("disk-budget"), help: "Most bytes of page files on disk (default: no limit).")
    var diskBudget: String?
    @Option(name: .customLong("disk-codec"), help: "Codec of pages written to disk, e.g. k4v4, tq3m, fp16+zstd (default k4v4).")
    var diskCodec: String?
    @Option(help: "JSON configuration file (keys: socket, stateDir, ramBudget, diskBudget, diskCodec, arenaSize, pageTokens, ioQueueDepth).")
    var config: String?
    @Flag(name: .customLong("print-config"), help: "Print the effective configuration as JSON and exit.")
    var printConfig = false
    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical (default info).")
    var logLevel = "info"

    func run() async throws {
        var settings = DaemonConfiguration()
        if let config { settings = try DaemonConfiguration.load(file: config) }
        if let socket { settings.socket = socket }
        if let stateDir { settings.stateDir = stateDir }
        if let ramBudget { settings.ramBudget = ramBudget }
        if let diskBudget { settings.diskBudget = diskBudget }
        if let diskCodec { settings.diskCodec = diskCodec }
        let resolved: DaemonConfiguration.Resolved
        do { resolved = try settings.resolved() } catch { throw ValidationError("\(error)") }
        if printConfig {
            print("""
                {"socket": "\(resolved.socket)", "stateDir": "\(resolved.stateDir)", "ramBudget": "\(ByteCount(resolved.ramBudgetBytes))", \
                "diskBudget": \(resolved.diskBudgetBytes.map { "\"\(ByteCount($0))\"" } ?? "null"), "diskCodec": "\(resolved.diskCodec)", \
                "arenaSize": "\(ByteCount(resolved.arenaBytes))", "pageTokens": \(resolved.pageTokens), "ioQueueDepth": \(resolved.ioQueueDepth)}
                """)
            return
        }
        guard let level = Logger.Level(rawValue: logLevel) else { throw ValidationError("--log-level must be one of trace, debug, info, notice, warning, error, critical") }
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        try await Daemon(configuration: resolved, logger: Logger(label: "kvtierd")).run()
    }
}
