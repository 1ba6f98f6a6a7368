#if canImport(Glibc)
@preconcurrency import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Histogram
import KVTierClient
import KVTierCore
import KVTierRemote

/// Serving throughput of kvtierd to several client processes, against Redis doing the same work
/// and against one core's memcpy: the engine of `kvtier bench serve`.
///
/// Starts a kvtierd of its own and `clients` worker processes (`ServeWorker`), each putting
/// distinct pages for `seconds` (or until its share of the working set is written), then getting
/// them back for `seconds` through shared memory, copying every page out of the arena into
/// private memory. With `compareRedis`, the same workload runs as SET/GET against a redis-server
/// of its own on a Unix socket. Everything it starts is stopped, and its folders removed, on every
/// path.
public struct ServeBenchmark: Sendable {
    public struct Report: Sendable, Encodable {
        public var clients: Int
        public var pageBytes: Int
        /// Pages each put and get moves in one request (Redis: MSET/MGET of that many keys).
        public var pagesPerGet: Int
        /// e.g. "1×[64, 8, 128] float16".
        public var pageShape: String
        /// Requested seconds per phase.
        public var seconds: Double
        /// Most bytes the put phase writes, all clients together.
        public var workingSetCapBytes: Int

        public var putGBps: Double
        public var putOps: Int
        public var putSeconds: Double
        public var putP50Micros: Double
        public var putP99Micros: Double
        public var getGBps: Double
        public var getOps: Int
        public var getSeconds: Double
        public var getP50Micros: Double
        public var getP99Micros: Double

        public var redisPutGBps: Double?
        public var redisPutOps: Int?
        public var redisPutP50Micros: Double?
        public var redisPutP99Micros: Double?
        public var redisGetGBps: Double?
        public var redisGetOps: Int?
        public var redisGetP50Micros: Double?
        public var redisGetP99Micros: Double?
        public var redisVersion: String?

        /// Single-core memcpy over a working set larger than the last-level cache.
        public var memcpyGBps: Double
        /// Single-core memcpy of one GET's bytes (`pagesPerGet × pageBytes`) at a time into one
        /// buffer of that size, from successive places of a source larger than the last-level
        /// cache: what a worker's copy out of the arena costs with nothing else around it.
        public var memcpyPerGetGBps: Double
        /// Microseconds of one such copy.
        public var memcpyPerGetMicros: Double
        public var getVsRedis: Double?
        public var putVsRedis: Double?
        public var getVsMemcpy: Double
        /// Get throughput (all clients) over the per-GET memcpy's.
        public var getVsMemcpyPerGet: Double
        public var cpuCores: Int
        public var daemon: String

        enum CodingKeys: String, CodingKey {
            case clients, pageBytes, pagesPerGet, pageShape, seconds, workingSetCapBytes
            case putGBps, putOps, putSeconds, putP50Micros, putP99Micros
            case getGBps, getOps, getSeconds, getP50Micros, getP99Micros
            case redisPutGBps, redisPutOps, redisPutP50Micros, redisPutP99Micros
            case redisGetGBps, redisGetOps, redisGetP50Micros, redisGetP99Micros, redisVersion
            case memcpyGBps, memcpyPerGetGBps, memcpyPerGetMicros, getVsRedis, putVsRedis, getVsMemcpy, getVsMemcpyPerGet, cpuCores, daemon
        }

        /// Every key always present: the Redis figures are `null` without `--compare-redis`.
        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(clients, forKey: .clients)
            try c.encode(pageBytes, forKey: .pageBytes)
            try c.encode(pagesPerGet, forKey: .pagesPerGet)
            try c.encode(pageShape, forKey: .pageShape)
            try c.encode(seconds, forKey: .seconds)
            try c.encode(workingSetCapBytes, forKey: .workingSetCapBytes)
            try c.encode(putGBps, forKey: .putGBps)
            try c.encode(putOps, forKey: .putOps)
            try c.encode(putSeconds, forKey: .putSeconds)
            try c.encode(putP50Micros, forKey: .putP50Micros)
            try c.encode(putP99Micros, forKey: .putP99Micros)
            try c.encode(getGBps, forKey: .getGBps)
            try c.encode(getOps, forKey: .getOps)
            try c.encode(getSeconds, forKey: .getSeconds)
            try c.encode(getP50Micros, forKey: .getP50Micros)
            try c.encode(getP99Micros, forKey: .getP99Micros)
            try c.encode(redisPutGBps, forKey: .redisPutGBps)
            try c.encode(redisPutOps, forKey: .redisPutOps)
            try c.encode(redisPutP50Micros, forKey: .redisPutP50Micros)
            try c.encode(redisPutP99Micros, forKey: .redisPutP99Micros)
            try c.encode(redisGetGBps, forKey: .redisGetGBps)
            try c.encode(redisGetOps, forKey: .redisGetOps)
            try c.encode(redisGetP50Micros, forKey: .redisGetP50Micros)
            try c.encode(redisGetP99Micros, forKey: .redisGetP99Micros)
            try c.encode(redisVersion, forKey: .redisVersion)
            try c.encode(memcpyGBps, forKey: .memcpyGBps)
            try c.encode(memcpyPerGetGBps, forKey: .memcpyPerGetGBps)
            try c.encode(memcpyPerGetMicros, forKey: .memcpyPerGetMicros)
            try c.encode(getVsRedis, forKey: .getVsRedis)
            try c.encode(putVsRedis, forKey: .putVsRedis)
            try c.encode(getVsMemcpy, forKey: .getVsMemcpy)
            try c.encode(getVsMemcpyPerGet, forKey: .getVsMemcpyPerGet)
            try c.encode(cpuCores, forKey: .cpuCores)
            try c.encode(daemon, forKey: .daemon)
        }
    }

    /// One phase of all workers together.
    public struct PhaseSummary: Sendable {
        public var operations: Int
        public var bytes: Int
        public var seconds: Double
        public var gbps: Double
        public var p50Micros: Double
        public var p99Micros: Double
    }

    public var clients: Int
    public var pageBytes: Int
    /// Pages per put and get request: a prefix of that many pages (1: one page per request).
    public var pagesPerGet: Int
    public var seconds: Double
    public var compareRedis: Bool
    /// The kvtierd binary.
    public var daemonPath: String
    /// How to start a worker: an executable and the arguments that select `serve-worker`
    /// (e.g. `[kvtier, "bench", "serve-worker"]`); the worker's options are appended.
    public var workerCommand: [String]
    /// Most bytes the put phase writes, all clients together (the daemon's RAM budget is sized
    /// from it so nothing is evicted to disk).
    public var maxWorkingSetBytes: Int
    /// Working set of the memcpy baseline (three times a 32 MiB L3).
    public var memcpyBytes = 96 << 20
    /// Where progress and the Redis installation notice go.
    public var note: @Sendable (String) -> Void

    public init(
        clients: Int = 4, pageBytes: Int = 256 << 10, pagesPerGet: Int = 1, seconds: Double = 5, compareRedis: Bool = false,
        daemonPath: String, workerCommand: [String], maxWorkingSetBytes: Int = 2 << 30,
        note: @escaping @Sendable (String) -> Void = { fputs("\($0)\n", stderr) }
    ) {
        self.clients = clients
        self.pageBytes = pageBytes
        self.pagesPerGet = pagesPerGet
        self.seconds = seconds
        self.compareRedis = compareRedis
        self.daemonPath = daemonPath
        self.workerCommand = workerCommand
        self.maxWorkingSetBytes = maxWorkingSetBytes
        self.note = note
    }

    /// kvtierd beside `executable` (the `kvtier` binary), as a release build installs them.
    public static func daemonBeside(_ executable: String) -> String {
        guard let slash = executable.lastIndex(of: "/") else { return "kvtierd" }
        return String(executable[..<slash]) + "/kvtierd"
    }

    public func run() async throws -> Report {
        guard clients >= 1 else { throw ToolError("--clients must be at least 1") }
        guard seconds > 0 else { throw ToolError("--seconds must be positive") }
        guard pagesPerGet >= 1 else { throw ToolError("--pages-per-get must be at least 1") }
        guard let spec = ServeWorker.model(pageBytes: pageBytes) else {
            throw ToolError("--page-size must be a multiple of \(ServeWorker.bytesPerToken) bytes "
                            + "(one token of 1 layer × 8 heads × 128 fp16 keys and values), at most \(Limits.maxPageTokens) tokens")
        }
        guard access(daemonPath, X_OK) == 0 else {
            throw ToolError("no kvtierd at \(daemonPath): build it (swift build -c release) or pass --daemon PATH")
        }
        // Whole prefixes of `pagesPerGet` pages per worker.
        let maxPages = max(1, maxWorkingSetBytes / clients / pageBytes / pagesPerGet) * pagesPerGet

        let memcpyGBps = Self.measureMemcpy(bytes: memcpyBytes)
        let memcpyPerGetGBps = Self.measureMemcpy(chunkBytes: pagesPerGet * pageBytes, sourceBytes: memcpyBytes)
        let scratch = try makeScratchDirectory(prefix: "kvtier-serve-")
        defer { removeTree(scratch) }

        // kvtierd, with room for the whole working set in RAM.
        let ramBudget = (maxPages * clients * pageBytes) + (maxPages * clients * 4096) + (256 << 20)
        let daemonSocket = scratch + "/kvtierd.sock"
        let daemonLog = scratch + "/kvtierd.log"
        let (put, get): (PhaseSummary, PhaseSummary)
        do {
            let daemon = try ServeChild(
                name: "kvtierd", executable: daemonPath,
                arguments: ["--socket", daemonSocket, "--state-dir", scratch + "/state", "--ram-budget", "\(ramBudget / (1 << 20))MiB",
                            "--log-level", "warning"],
                pipes: false, logPath: daemonLog)
            defer { daemon.terminate() }
            await (try await connectWhenServing(daemon, socket: daemonSocket, log: daemonLog, clientName: "bench-serve")).close()
            (put, get) = try await runWorkers(.kvtier, socket: daemonSocket, maxPages: maxPages) {
                guard daemon.isRunning else { throw ToolError("kvtierd exited during the run:\n\(Self.tail(daemonLog))") }
            }
            let status = daemon.terminate()
            if status != 0 { note("warning: kvtierd exited with wait status \(status); log:\n\(Self.tail(daemonLog))") }
        }

        var redis: (put: PhaseSummary, get: PhaseSummary, version: String?)?
        if compareRedis {
            let server = try Self.ensureRedisServer(note: note)
            let redisSocket = scratch + "/redis.sock"
            let redisLog = scratch + "/redis.log"
            let process = try ServeChild(
                name: "redis-server", executable: server,
                arguments: ["--port", "0", "--unixsocket", redisSocket, "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                            "--daemonize", "no", "--dir", scratch, "--maxmemory", "0"],
                pipes: false, logPath: redisLog)
            defer { process.terminate() }
            let version = try Self.waitForRedis(process, socket: redisSocket, log: redisLog)
            let (p, g) = try await runWorkers(.redis, socket: redisSocket, maxPages: maxPages) {
                guard process.isRunning else { throw ToolError("redis-server exited during the run:\n\(Self.tail(redisLog))") }
            }
            redis = (p, g, version)
            process.terminate()
        }

        return Report(
            clients: clients, pageBytes: pageBytes, pagesPerGet: pagesPerGet, pageShape: "1×[\(spec.pageTokens), 8, 128] float16", seconds: seconds,
            workingSetCapBytes: maxPages * clients * pageBytes,
            putGBps: put.gbps, putOps: put.operations, putSeconds: put.seconds, putP50Micros: put.p50Micros, putP99Micros: put.p99Micros,
            getGBps: get.gbps, getOps: get.operations, getSeconds: get.seconds, getP50Micros: get.p50Micros, getP99Micros: get.p99Micros,
            redisPutGBps: redis?.put.gbps, redisPutOps: redis?.put.operations,
            redisPutP50Micros: redis?.put.p50Micros, redisPutP99Micros: redis?.put.p99Micros,
            redisGetGBps: redis?.get.gbps, redisGetOps: redis?.get.operations,
            redisGetP50Micros: redis?.get.p50Micros, redisGetP99Micros: redis?.get.p99Micros, redisVersion: redis?.version,
            memcpyGBps: memcpyGBps, memcpyPerGetGBps: memcpyPerGetGBps,
            memcpyPerGetMicros: memcpyPerGetGBps > 0 ? Double(pagesPerGet * pageBytes) / memcpyPerGetGBps / 1e3 : 0,
            getVsRedis: redis.map { get.gbps / $0.get.gbps }, putVsRedis: redis.map { put.gbps / $0.put.gbps },
            getVsMemcpy: get.gbps / memcpyGBps, getVsMemcpyPerGet: get.gbps / memcpyPerGetGBps, cpuCores: ProcessInfo.processInfo.activeProcessorCount, daemon: daemonPath)
    }

    // MARK: workers

    /// Starts the workers, runs the put phase then the get phase on all of them at once, and
    /// ends them. `check` runs while waiting, to notice a server that died.
    func runWorkers(_ backend: ServeWorker.Backend, socket: String, maxPages: Int,
                    check: () throws -> Void) async throws -> (put: PhaseSummary, get: PhaseSummary) {
        guard let executable = workerCommand.first else { throw ToolError("no worker command") }
        var workers: [ServeChild] = []
        defer { for worker in workers { worker.terminate(graceSeconds: 2) } }
        for w in 0..<clients {
            let arguments = Array(workerCommand.dropFirst()) + [
                "--backend", backend.rawValue, "--socket", socket, "--worker", "\(w)", "--page-size", "\(pageBytes)",
                "--seconds", "\(seconds)", "--max-pages", "\(maxPages)", "--pages-per-get", "\(pagesPerGet)",
            ]
            workers.append(try ServeChild(name: "\(backend) worker \(w)", executable: executable, arguments: arguments, pipes: true, logPath: nil))
        }
        for worker in workers {
            let line = try worker.receiveLine(timeoutSeconds: 60)
            guard line == "ready" else {
                try check()
                throw ToolError("\(worker.name) did not start (said \(line.map { "'\($0.prefix(200))'" } ?? "nothing")); see its errors above")
            }
        }
        func phase(_ name: String) throws -> PhaseSummary {
            for worker in workers { try worker.send(name) }
            var results: [ServePhaseResult] = []
            let decoder = JSONDecoder()
            for worker in workers {
                guard let line = try worker.receiveLine(timeoutSeconds: seconds + 120) else {
                    try check()
                    throw ToolError("\(worker.name) stopped during the \(name) phase; see its errors above")
                }
                do { results.append(try decoder.decode(ServePhaseResult.self, from: Data(line.utf8))) } catch {
                    throw ToolError("\(worker.name) answered the \(name) phase with '\(line.prefix(200))'")
                }
            }
            try check()
            return Self.summarize(results)
        }
        let put = try phase("put")
        let get = try phase("get")
        for worker in workers { try? worker.send("quit") }
        for worker in workers {
            if let status = worker.waitForExit(timeoutSeconds: 10), status != 0 {
                note("warning: \(worker.name) exited with wait status \(status)")
            }
        }
        return (put, get)
    }

    /// Throughput over the span from the first worker's start to the last one's end; latency
    /// percentiles over every operation of every worker.
    static func summarize(_ results: [ServePhaseResult]) -> PhaseSummary {
        var histogram = ServeWorker.makeHistogram()
        for result in results { histogram.add(result.latencyNanos) }
        let start = results.map(\.startNanos).min() ?? 0
        let end = results.map(\.endNanos).max() ?? 0
        let seconds = Double(end &- start) / 1e9
        let bytes = results.map(\.bytes).reduce(0, +)
        return PhaseSummary(
            operations: results.map(\.operations).reduce(0, +), bytes: bytes, seconds: seconds,
            gbps: seconds > 0 ? Double(bytes) / seconds / 1e9 : 0,
            p50Micros: Double(histogram.valueAtPercentile(50)) / 1000, p99Micros: Double(histogram.valueAtPercentile(99)) / 1000)
    }

    // MARK: servers

    /// Waits until redis answers PING; returns its version.
    static func waitForRedis(_ process: ServeChild, socket: String, log: String) throws -> String? {
        let deadline = Clocks.monotonicNanoseconds() + 20_000_000_000
        while Clocks.monotonicNanoseconds() < deadline {
            guard process.isRunning else { throw ToolError("redis-server exited before listening:\n\(Self.tail(log))") }
            if access(socket, F_OK) == 0, let connection = try? RESPConnection.connect(to: .unix(path: socket), timeoutMillis: 2_000),
               (try? connection.command(["PING"])) == .simple("PONG") {
                guard case .bulk(let info?) = try connection.command(["INFO", "server"]) else { return nil }
                let line = String(decoding: info, as: UTF8.self).split(whereSeparator: \.isNewline).first { $0.hasPrefix("redis_version:") }
                return line.map { String($0.dropFirst("redis_version:".count)) }
            }
            usleep(50_000)
        }
        throw ToolError("redis-server did not answer on \(socket) within 20 s:\n\(Self.tail(log))")
    }

    /// `redis-server` from PATH; when missing, installs the Debian package with apt-get (saying
    /// so on stderr; apt's own output goes to stderr too, never to stdout).
    static func ensureRedisServer(note: (String) -> Void) throws -> String {
        if let found = findExecutable("redis-server") { return found }
        guard let apt = findExecutable("apt-get") else {
            throw ToolError("redis-server is not installed and there is no apt-get to install it; install Redis or drop --compare-redis")
        }
        note("redis-server not found: installing the Debian package (apt-get install -y redis-server)")
        func aptGet(_ arguments: [String]) -> Int32 {
            guard let child = try? ServeChild(name: "apt-get", executable: apt, arguments: arguments, pipes: false, logPath: nil) else { return -1 }
            return child.waitForExit(timeoutSeconds: 600) ?? child.terminate()
        }
        setenv("DEBIAN_FRONTEND", "noninteractive", 1)
        if aptGet(["install", "-y", "-q", "redis-server"]) != 0 {
            note("apt-get install failed; running apt-get update and trying again")
            _ = aptGet(["update", "-q"])
            _ = aptGet(["install", "-y", "-q", "redis-server"])
        }
        guard let installed = findExecutable("redis-server") else {
            throw ToolError("could not install redis-server with apt-get (see its output above); install it or drop --compare-redis")
        }
        return installed
    }

    static func tail(_ path: String, lines: Int = 20) -> String {
        guard let data = FileManager.default.contents(atPath: path) else { return "(no log at \(path))" }
        return String(decoding: data, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
    }

    // MARK: memcpy

    /// Single-core memcpy of `bytes` (a working set larger than the last-level cache), fastest of
    /// 5 passes, as `CodecBenchmark` measures it.
    public static func measureMemcpy(bytes: Int) -> Double {
        let source = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes, alignment: 64)
        let destination = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes, alignment: 64)
        defer { source.deallocate(); destination.deallocate() }
        source.initializeMemory(as: UInt8.self, repeating: 0x5A)
        destination.initializeMemory(as: UInt8.self, repeating: 0)
        guard let copy = OpaqueMemcpy.copy else { return 0 }
        let seconds = Stopwatch.best(repetitions: 5) { _ = copy(destination.baseAddress, source.baseAddress, bytes) }
        return Double(bytes) / seconds / 1e9
    }

    /// Single-core memcpy of `chunkBytes` at a time into one buffer of that size (touched
    /// before, as a worker's private copy is), from successive chunks of a source of at least
    /// `sourceBytes` (larger than the last-level cache, as the arena's pages are): one pass over
    /// the source, fastest of 5.
    public static func measureMemcpy(chunkBytes: Int, sourceBytes: Int) -> Double {
        let chunks = max(1, sourceBytes / max(1, chunkBytes))
        let source = UnsafeMutableRawBufferPointer.allocate(byteCount: chunks * chunkBytes, alignment: 4096)
        let destination = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkBytes, alignment: 4096)
        defer { source.deallocate(); destination.deallocate() }
        source.initializeMemory(as: UInt8.self, repeating: 0x5A)
        destination.initializeMemory(as: UInt8.self, repeating: 0)
        guard let copy = OpaqueMemcpy.copy else { return 0 }
        let seconds = Stopwatch.best(repetitions: 5) {
            for chunk in 0..<chunks { _ = copy(destination.baseAddress, source.baseAddress! + chunk * chunkBytes, chunkBytes) }
        }
        return Double(chunks * chunkBytes) / seconds / 1e9
    }
}
