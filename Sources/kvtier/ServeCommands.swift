import ArgumentParser
import Dispatch
#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import KVTierCore
import KVTierTools

/// `kvtier bench serve`: kvtierd serving pages to several client processes, against Redis.
struct ServeBenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Measure kvtierd put/get throughput to several client processes (optionally against Redis).",
        discussion: """
            Starts its own kvtierd (the one beside this kvtier, or --daemon) on a temporary socket and \
            N worker processes ('kvtier bench serve-worker'). Each worker puts distinct pages of \
            --page-size bytes (1 layer × [tokens, 8, 128] float16) for --seconds (or until the working \
            set cap is written), then gets them back through shared memory for --seconds, copying each \
            page out of the arena into private memory. --pages-per-get K makes each put and get one \
            request for a prefix of K pages (Redis: MSET/MGET of K keys). --compare-redis runs the \
            same workload as SET/GET against its own redis-server on a Unix socket (installing the Debian package with \
            apt-get when redis-server is missing). Baselines on one core: memcpy of 96 MiB, and memcpy \
            of one GET's bytes at a time into one buffer, from successive places of a 96 MiB source.
            """
    )

    @Option(help: "Client processes.") var clients = 4
    @Option(name: .customLong("page-size"), help: "Bytes per page, e.g. 256KiB (a multiple of 4 KiB).") var pageSize = "256KiB"
    @Option(name: .customLong("pages-per-get"), help: "Pages per put and get request (a prefix of that many pages; Redis: MSET/MGET).")
    var pagesPerGet = 1
    @Option(help: "Seconds per phase (put, then get).") var seconds = 5.0
    @Flag(name: .customLong("compare-redis"), help: "Run the same workload against redis-server.") var compareRedis = false
    @Option(help: "kvtierd binary (default: the one beside this kvtier).") var daemon: String?
    @Option(name: .customLong("max-working-set"), help: "Most bytes the put phase writes, all clients together.")
    var maxWorkingSet = "2GiB"
    @Flag(help: "Print the report as JSON.") var json = false

    func run() async throws {
        guard let pageBytes = ByteCount(parsing: pageSize)?.bytes else { throw ValidationError("--page-size: cannot read '\(pageSize)'") }
        guard let cap = ByteCount(parsing: maxWorkingSet)?.bytes else { throw ValidationError("--max-working-set: cannot read '\(maxWorkingSet)'") }
        let executable = currentExecutablePath()
        let benchmark = ServeBenchmark(
            clients: clients, pageBytes: pageBytes, pagesPerGet: pagesPerGet, seconds: seconds, compareRedis: compareRedis,
            daemonPath: daemon ?? ServeBenchmark.daemonBeside(executable),
            workerCommand: [executable, "bench", "serve-worker"], maxWorkingSetBytes: cap)
        let signals = installBenchInterruptCleanup()
        defer { for source in signals { source.cancel() } }
        let r: ServeBenchmark.Report
        // A failure of the run (the daemon exited, a put was refused) is not a usage error: it is
        // reported as it is, with exit status 1, not as bad arguments with the usage text.
        r = try await benchmark.run()
        if json { return try printJSON(r) }
        func gbps(_ v: Double?) -> String { v.map { formatDecimal($0, places: 2) + " GB/s" } ?? "-" }
        func micros(_ p50: Double?, _ p99: Double?) -> String {
            guard let p50, let p99 else { return "-" }
            return "p50 \(formatDecimal(p50, places: 1)) µs, p99 \(formatDecimal(p99, places: 1)) µs"
        }
        func ratio(_ v: Double?) -> String { v.map { formatDecimal($0, places: 2) + "×" } ?? "-" }
        printTable(["MEASURE", "KVTIERD", "REDIS"], [
            ["clients × page", "\(r.clients) × \(r.pagesPerGet) × \(ByteCount(r.pageBytes)) (\(r.pageShape))", r.redisVersion.map { "redis \($0)" } ?? "-"],
            ["get", gbps(r.getGBps), gbps(r.redisGetGBps)],
            ["get latency", micros(r.getP50Micros, r.getP99Micros), micros(r.redisGetP50Micros, r.redisGetP99Micros)],
            ["put", gbps(r.putGBps), gbps(r.redisPutGBps)],
            ["put latency", micros(r.putP50Micros, r.putP99Micros), micros(r.redisPutP50Micros, r.redisPutP99Micros)],
            ["get / redis", ratio(r.getVsRedis), ""],
            ["get / memcpy", ratio(r.getVsMemcpy) + " (memcpy \(gbps(r.memcpyGBps)), 1 core)", ""],
            ["get / memcpy per GET", ratio(r.getVsMemcpyPerGet) + " (memcpy of one GET's \(ByteCount(r.pagesPerGet * r.pageBytes)): "
                + "\(gbps(r.memcpyPerGetGBps)), \(formatDecimal(r.memcpyPerGetMicros, places: 1)) µs, 1 core)", ""],
        ])
    }
}

/// On SIGINT or SIGTERM: stop the children of a `kvtier bench` run (daemon, redis, workers),
/// remove its folders, exit.
func installBenchInterruptCleanup() -> [any DispatchSourceSignal] {
    [SIGINT, SIGTERM].map { (number: Int32) -> any DispatchSourceSignal in
        _ = signal(number, SIG_IGN)
        let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
        source.setEventHandler {
            ServeChildRegistry.cleanUpAfterInterruption()
            Glibc.exit(128 + number)
        }
        source.resume()
        return source
    }
}

/// `kvtier bench serve-worker` (hidden): one client process of `kvtier bench serve`.
struct ServeWorkerCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve-worker",
        abstract: "One client process of 'kvtier bench serve' (driven over stdin/stdout).",
        shouldDisplay: false
    )

    @Option var backend: ServeWorker.Backend
    @Option var socket: String
    @Option var worker: Int
    @Option(name: .customLong("page-size")) var pageSize: Int
    @Option var seconds: Double
    @Option(name: .customLong("max-pages")) var maxPages: Int
    @Option(name: .customLong("pages-per-get")) var pagesPerGet = 1

    func run() async throws {
        let options = ServeWorker.Options(backend: backend, socketPath: socket, worker: worker, pageBytes: pageSize,
                                          seconds: seconds, maxPages: maxPages, pagesPerGet: pagesPerGet)
        try await ServeWorker.run(options, receive: { readLine() }, send: { line in
            print(line)
            fflush(stdout)
        })
    }
}

extension ServeWorker.Backend: ExpressibleByArgument {}
