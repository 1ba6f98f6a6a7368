@preconcurrency import Glibc
import Foundation

/// A real redis-server (or valkey-server) for the remote tier's tests: its own directory, no
/// persistence, a Unix socket (and a loopback TCP port when asked), started supervised so that
/// its READY=1 arrives on a `NotifySocket` (no polling for the socket to appear). Killed when
/// the test is done with it. `scripts/install-deps` installs the Debian package redis-server;
/// where neither binary is on PATH, `unavailableReason` says so and the tests skip.
public final class RedisServer: @unchecked Sendable {
    // Invariant: `pid` changes only in start/kill/stop, which one test calls from one task.
    public let directory: String
    public let socketPath: String
    public let tcpPort: UInt16?
    public private(set) var pid: pid_t = 0
    let executable: String
    let extraArguments: [String]
    let notify: NotifySocket

    /// The server binary on PATH: redis-server, else valkey-server.
    public static let executablePath: String? = {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"
        for name in ["redis-server", "valkey-server"] {
            for directory in path.split(separator: ":") where access("\(directory)/\(name)", X_OK) == 0 {
                return "\(directory)/\(name)"
            }
        }
        return nil
    }()

    /// Why these tests cannot run here; nil when a server binary is installed.
    public static var unavailableReason: String? {
        executablePath == nil ? "neither redis-server nor valkey-server is on PATH (scripts/install-deps installs the Debian package redis-server)" : nil
    }

    /// Starts a server in a fresh directory under /tmp (short, for sun_path).
    /// `extraArguments`: further `--option value` pairs (maxmemory, requirepass, …).
    public init(tcpPort: UInt16? = nil, extraArguments: [String] = []) throws(ProcessFailure) {
        guard let executable = Self.executablePath else { throw ProcessFailure(Self.unavailableReason!) }
        var template = Array("/tmp/kvr-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { buffer -> String? in
            mkdtemp(buffer.baseAddress!).map { String(cString: $0) }
        }
        guard let made else { throw ProcessFailure("mkdtemp: errno \(errno)") }
        directory = made
        socketPath = made + "/redis.sock"
        self.tcpPort = tcpPort
        self.executable = executable
        self.extraArguments = extraArguments
        notify = try NotifySocket(path: made + "/notify")
        try start()
    }

    deinit {
        kill()
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// Starts the server (again, after `kill` or `stop`: same socket, same port, empty data) and
    /// waits for its READY=1.
    public func start() throws(ProcessFailure) {
        precondition(pid == 0, "the server is running already")
        let arguments = [executable, "--port", "\(tcpPort ?? 0)", "--bind", "127.0.0.1", "--unixsocket", socketPath,
                         "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir", directory,
                         "--supervised", "systemd", "--loglevel", "warning"] + extraArguments
        var environment = ProcessInfo.processInfo.environment
        environment["NOTIFY_SOCKET"] = notify.path
        pid = try ChildSpawn.spawn(arguments, environment: environment, logPath: directory + "/redis.log")
        let messages = notify.receive(until: { $0.contains("READY=1") }, seconds: 20)
        guard messages.contains(where: { $0.contains("READY=1") }) else {
            let log = (try? String(contentsOfFile: directory + "/redis.log", encoding: .utf8)) ?? ""
            kill()
            throw ProcessFailure("redis-server sent no READY=1 within 20 s:\n\(log.suffix(2000))")
        }
    }

    /// SIGKILL, as a crash or an operator's kill -9 would; reaped before returning.
    public func kill() { end(SIGKILL) }

    /// SIGTERM, a clean stop; reaped before returning.
    public func stop() { end(SIGTERM) }

    /// SIGSTOP: the server keeps its connections but answers nothing (a hung server).
    public func freeze() { _ = Glibc.kill(pid, SIGSTOP) }

    /// SIGCONT after `freeze`.
    public func thaw() { _ = Glibc.kill(pid, SIGCONT) }

    private func end(_ signal: Int32) {
        guard pid > 0 else { return }
        _ = Glibc.kill(pid, signal)
        _ = Glibc.kill(pid, SIGCONT)
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        pid = 0
        unlink(socketPath)
    }
}
