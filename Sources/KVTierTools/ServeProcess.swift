#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import KVTierClient
import KVTierCore
import Synchronization

/// A child process of `kvtier bench serve` (the daemon, redis-server, a worker), started with
/// posix_spawn. Workers talk to the parent over pipes, one line at a time: the parent writes
/// commands to the worker's stdin, the worker answers on its stdout.
final class ServeChild {
    let pid: pid_t
    let name: String
    private var input: Int32
    private var output: Int32
    private var pending: [UInt8] = []
    private var reaped: Int32?

    /// Starts `executable` with `arguments`. With `pipes`, stdin and stdout are pipes to this
    /// process; otherwise stdin is /dev/null. stdout (without pipes) and stderr go to `logPath`
    /// when given, else they are this process's stderr (never its stdout, which carries JSON).
    init(name: String, executable: String, arguments: [String], pipes: Bool, logPath: String?) throws {
        self.name = name
        var toChild: [Int32] = [-1, -1]
        var fromChild: [Int32] = [-1, -1]
        if pipes {
            guard pipe(&toChild) == 0 else { throw ToolError("pipe: errno \(errno)") }
            guard pipe(&fromChild) == 0 else {
                close(toChild[0]); close(toChild[1])
                throw ToolError("pipe: errno \(errno)")
            }
            // No other child may inherit these ends, or EOF would never come.
            for fd in toChild + fromChild { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        if pipes {
            posix_spawn_file_actions_adddup2(&actions, toChild[0], STDIN_FILENO)
            posix_spawn_file_actions_adddup2(&actions, fromChild[1], STDOUT_FILENO)
        } else {
            posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0)
        }
        if let logPath {
            posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, logPath, O_WRONLY | O_CREAT | O_APPEND, 0o644)
            if !pipes { posix_spawn_file_actions_adddup2(&actions, STDERR_FILENO, STDOUT_FILENO) }
        } else if !pipes {
            posix_spawn_file_actions_adddup2(&actions, STDERR_FILENO, STDOUT_FILENO)
        }
        let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        var child: pid_t = 0
        let status = posix_spawnp(&child, executable, &actions, nil, argv, environ)
        if pipes {
            close(toChild[0])
            close(fromChild[1])
        }
        guard status == 0 else {
            if pipes { close(toChild[1]); close(fromChild[0]) }
            throw ToolError("cannot start \(executable): \(String(cString: strerror(status)))")
        }
        pid = child
        input = pipes ? toChild[1] : -1
        output = pipes ? fromChild[0] : -1
        ServeChildRegistry.add(child)
    }

    deinit {
        terminate()
    }

    /// Whether the process is still running (reaps it when it has exited).
    var isRunning: Bool {
        guard reaped == nil else { return false }
        var status: Int32 = 0
        if waitpid(pid, &status, WNOHANG) == pid {
            reaped = status
            ServeChildRegistry.remove(pid)
            return false
        }
        return true
    }

    /// Writes one line to the child's stdin.
    func send(_ line: String) throws {
        guard input >= 0 else { throw ToolError("\(name) has no input pipe") }
        let bytes = Array((line + "\n").utf8)
        var sent = 0
        while sent < bytes.count {
            let n = bytes[sent...].withUnsafeBytes { write(input, $0.baseAddress!, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw ToolError("cannot write to \(name): errno \(errno) (did it exit?)")
            }
            sent += n
        }
    }

    /// The next line of the child's stdout, waiting at most `timeoutSeconds`; nil at EOF.
    func receiveLine(timeoutSeconds: Double) throws -> String? {
        guard output >= 0 else { throw ToolError("\(name) has no output pipe") }
        let deadline = Clocks.monotonicNanoseconds() + UInt64(timeoutSeconds * 1e9)
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            if let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: pending[..<newline], as: UTF8.self)
                pending.removeSubrange(...newline)
                return line
            }
            let now = Clocks.monotonicNanoseconds()
            guard now < deadline else { throw ToolError("\(name) did not answer within \(Int(timeoutSeconds)) s") }
            var waiting = pollfd(fd: output, events: Int16(POLLIN), revents: 0)
            let ready = poll(&waiting, 1, Int32(min(1000, (deadline - now) / 1_000_000 + 1)))
            if ready < 0 && errno != EINTR { throw ToolError("poll on \(name): errno \(errno)") }
            guard ready > 0 else { continue }
            let n = chunk.withUnsafeMutableBytes { read(output, $0.baseAddress!, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw ToolError("cannot read from \(name): errno \(errno)")
            }
            if n == 0 {
                guard !pending.isEmpty else { return nil }
                let line = String(decoding: pending, as: UTF8.self)
                pending = []
                return line
            }
            pending += chunk[0..<n]
        }
    }

    /// Waits up to `timeoutSeconds` for the child to exit by itself; its wait status, or nil.
    func waitForExit(timeoutSeconds: Double) -> Int32? {
        let deadline = Clocks.monotonicNanoseconds() + UInt64(timeoutSeconds * 1e9)
        while isRunning {
            if Clocks.monotonicNanoseconds() >= deadline { return nil }
            usleep(10_000)
        }
        return reaped
    }

    /// Closes the pipes, sends SIGTERM, waits up to `graceSeconds`, then SIGKILL. Idempotent.
    @discardableResult
    func terminate(graceSeconds: Double = 5) -> Int32 {
        if input >= 0 { close(input); input = -1 }
        if output >= 0 { close(output); output = -1 }
        guard isRunning else { return reaped ?? 0 }
        _ = kill(pid, SIGTERM)
        if let status = waitForExit(timeoutSeconds: graceSeconds) { return status }
        _ = kill(pid, SIGKILL)
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        reaped = status
        ServeChildRegistry.remove(pid)
        return status
    }
}

/// Children and scratch folders alive right now, so an interrupted `kvtier bench serve`
/// (SIGINT, SIGTERM) can end and remove them before it exits.
public enum ServeChildRegistry {
    private static let state = Mutex<(pids: Set<pid_t>, directories: Set<String>)>(([], []))

    static func add(_ pid: pid_t) { state.withLock { _ = $0.pids.insert(pid) } }
    static func remove(_ pid: pid_t) { state.withLock { _ = $0.pids.remove(pid) } }
    static func add(directory: String) { state.withLock { _ = $0.directories.insert(directory) } }
    static func remove(directory: String) { state.withLock { _ = $0.directories.remove(directory) } }

    /// SIGTERM to every live child, a short grace, SIGKILL to the rest, then removes the scratch
    /// folders. For an interrupted run only: normal runs clean up as they go.
    public static func cleanUpAfterInterruption() {
        let (pids, directories) = state.withLock { ($0.pids, $0.directories) }
        for pid in pids { _ = kill(pid, SIGTERM) }
        var left = pids
        for _ in 0..<100 where !left.isEmpty {
            usleep(30_000)
            left = left.filter { var s: Int32 = 0; return waitpid($0, &s, WNOHANG) != $0 }
        }
        for pid in left {
            _ = kill(pid, SIGKILL)
            var s: Int32 = 0
            _ = waitpid(pid, &s, 0)
        }
        for directory in directories { removeTree(directory) }
    }
}

/// Makes a fresh folder `/tmp/<prefix>XXXXXX`.
func makeScratchDirectory(prefix: String) throws -> String {
    var template = Array("/tmp/\(prefix)XXXXXX".utf8CString)
    guard let made = mkdtemp(&template) else { throw ToolError("mkdtemp: errno \(errno)") }
    let path = String(cString: made)
    ServeChildRegistry.add(directory: path)
    return path
}

/// Removes a folder and everything in it (no symlinks followed).
func removeTree(_ path: String) {
    guard let dir = opendir(path) else {
        _ = unlink(path)
        return
    }
    var children: [String] = []
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
            String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
        }
        if name != "." && name != ".." { children.append(name) }
    }
    closedir(dir)
    for child in children {
        let full = path + "/" + child
        var info = stat()
        if lstat(full, &info) == 0 && info.st_mode & S_IFMT == S_IFDIR {
            removeTree(full)
        } else {
            _ = unlink(full)
        }
    }
    _ = rmdir(path)
    ServeChildRegistry.remove(directory: path)
}

/// This executable's path (`/proc/self/exe`), falling back to `argv[0]`.
public func currentExecutablePath() -> String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    if n > 0 { return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) }
    return CommandLine.arguments.first ?? "kvtier"
}

/// The executable `name` on `PATH` (or the usual sbin/bin folders), or nil.
func findExecutable(_ name: String) -> String? {
    var folders = (getenv("PATH").map { String(cString: $0) } ?? "").split(separator: ":").map(String.init)
    folders += ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
    for folder in folders where !folder.isEmpty {
        let candidate = folder + "/" + name
        if access(candidate, X_OK) == 0 { return candidate }
    }
    return nil
}

/// How long a benchmark waits for the kvtierd it started to answer: only a stuck daemon takes
/// this long (a debug build on a loaded two-core machine has taken over 20 s).
let daemonStartSeconds: UInt64 = 120

/// A client of the kvtierd a benchmark just started, once it answers a PING (up to
/// `daemonStartSeconds`); fails with the end of its log if it exits or stays silent.
func connectWhenServing(_ daemon: ServeChild, socket: String, log: String, clientName: String) async throws -> KVTierClient {
    let deadline = Clocks.monotonicNanoseconds() + daemonStartSeconds * 1_000_000_000
    while Clocks.monotonicNanoseconds() < deadline {
        guard daemon.isRunning else { throw ToolError("kvtierd exited before listening:\n\(ServeBenchmark.tail(log))") }
        if access(socket, F_OK) == 0, let client = try? await KVTierClient.connect(socketPath: socket, clientName: clientName, replyTimeoutSeconds: 10) {
            if (try? await client.ping()) != nil { return client }
            await client.close()
        }
        usleep(50_000)
    }
    throw ToolError("kvtierd did not answer on \(socket) within \(daemonStartSeconds) s:\n\(ServeBenchmark.tail(log))")
}
