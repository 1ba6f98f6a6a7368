@preconcurrency import Glibc
import Foundation
import KVTierClient
import Testing

/// A seed from `KVTIER_TEST_SEED` when set, otherwise random; printed so a failure replays.
func testSeed(_ name: String) -> UInt64 {
    let seed: UInt64
    if let text = getenv("KVTIER_TEST_SEED").map({ String(cString: $0) }), let parsed = UInt64(text) {
        seed = parsed
    } else {
        seed = UInt64.random(in: 0...UInt64.max)
    }
    print("\(name): seed \(seed) (rerun with KVTIER_TEST_SEED=\(seed))")
    return seed
}

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// A `kvtierd` started for one test in a fresh temporary folder; `stop` ends it (SIGTERM, then
/// SIGKILL) and removes the folder.
final class DaemonProcess {
    /// Environment variable naming the daemon binary explicitly.
    static let environmentVariable = "KVTIER_DAEMON"

    /// The daemon binary: `$KVTIER_DAEMON`, else `.build/debug/kvtierd` of this checkout.
    static let binary: String? = {
        var candidates: [String] = []
        if let explicit = getenv(environmentVariable) { candidates.append(String(cString: explicit)) }
        let repository = parent(parent(parent(#filePath)))
        candidates.append(repository + "/.build/debug/kvtierd")
        return candidates.first { access($0, X_OK) == 0 }
    }()

    static let skipReason: Comment = "no kvtierd binary: build it (swift build --product kvtierd) or set KVTIER_DAEMON"

    let pid: pid_t
    let directory: String
    var socketPath: String { directory + "/s.sock" }
    var logPath: String { directory + "/kvtierd.log" }
    private(set) var stopped = false

    /// Only a stuck daemon reaches this; a loaded two-core machine starts one in a few seconds.
    static let readyDeadlineSeconds = 120

    /// Starts the daemon and waits until it sends READY=1 on a NOTIFY_SOCKET of the test's own
    /// (once its socket listens), on a thread of its own: the old PING loop slept on a thread of
    /// the cooperative pool, and with two such waits on a two-core machine the in-process
    /// servers of other suites starved and timed out. `reusing` restarts a stopped daemon's
    /// folder (its socket path and state directory).
    static func start(ramBudget: String = "64MiB", arguments: [String] = [], reusing earlier: DaemonProcess? = nil) async throws -> DaemonProcess {
        guard let binary else { throw TestFailure("\(skipReason)") }
        let directory: String
        if let earlier {
            directory = earlier.directory
        } else {
            var template = Array("/tmp/kvtier-client-XXXXXX".utf8CString)
            guard let made = mkdtemp(&template) else { throw TestFailure("mkdtemp: errno \(errno)") }
            directory = String(cString: made)
        }
        let notifyPath = directory + "/ready-\(UInt32.random(in: 0...UInt32.max)).notify"
        let notify = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard notify >= 0, bindDatagram(notify, path: notifyPath) else { throw TestFailure("NOTIFY_SOCKET \(notifyPath): errno \(errno)") }
        defer {
            close(notify)
            unlink(notifyPath)
        }
        let daemon = try DaemonProcess(binary: binary, directory: directory, ramBudget: ramBudget, extra: arguments, notifySocket: notifyPath)
        let pid = daemon.pid
        let outcome = await withCheckedContinuation { (continuation: CheckedContinuation<String, Never>) in
            Thread { continuation.resume(returning: waitForReady(notify: notify, pid: pid, seconds: readyDeadlineSeconds)) }.start()
        }
        switch outcome {
        case "ready":
            return daemon
        case "exited":
            var status: Int32 = 0
            _ = waitpid(daemon.pid, &status, 0)
            daemon.stopped = true
            throw TestFailure("kvtierd exited with status \(status) before READY=1:\n\(daemon.logTail())")
        default:
            throw TestFailure("kvtierd sent no READY=1 within \(readyDeadlineSeconds) s:\n\(daemon.logTail())")
        }
    }

    /// Blocks until READY=1 arrives on `notify` ("ready"), process `pid` exits ("exited", seen
    /// on its pidfd) or `seconds` pass ("deadline").
    private static func waitForReady(notify: Int32, pid: pid_t, seconds: Int) -> String {
        let pidfd = pidDescriptor(pid)
        defer { if pidfd >= 0 { close(pidfd) } }
        let deadline = ContinuousClock.now + .seconds(seconds)
        var buffer = [UInt8](repeating: 0, count: 4096)
        while ContinuousClock.now < deadline {
            var fds = [pollfd(fd: notify, events: Int16(POLLIN), revents: 0), pollfd(fd: pidfd, events: Int16(POLLIN), revents: 0)]
            // Without a pidfd (old kernel), look at the process every 100 ms.
            _ = poll(&fds, pidfd >= 0 ? 2 : 1, pidfd >= 0 ? 1000 : 100)
            if fds[0].revents != 0 {
                let n = buffer.withUnsafeMutableBytes { recv(notify, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
                if n > 0, String(decoding: buffer[0..<n], as: UTF8.self).contains("READY=1") { return "ready" }
            }
            if pidfd >= 0 ? fds[1].revents != 0 : kill(pid, 0) != 0 || hasExited(pid) { return "exited" }
        }
        return "deadline"
    }

    private typealias PidfdOpen = @convention(c) (pid_t, UInt32) -> Int32

    /// A descriptor readable once `pid` exits, or -1 where pidfd_open is missing.
    static func pidDescriptor(_ pid: pid_t) -> Int32 {
        guard let symbol = dlsym(nil, "pidfd_open") else { return -1 }
        return unsafeBitCast(symbol, to: PidfdOpen.self)(pid, 0)
    }

    /// Whether child `pid` exited, leaving it waitable.
    static func hasExited(_ pid: pid_t) -> Bool {
        var info = siginfo_t()
        return waitid(P_PID, id_t(pid), &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info._sifields._sigchld.si_pid == pid
    }

    private static func bindDatagram(_ descriptor: Int32, path: String) -> Bool {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in for (i, b) in path.utf8.enumerated() { raw[i] = b } }
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) == 0 }
        }
    }

    private init(binary: String, directory: String, ramBudget: String, extra: [String], notifySocket: String) throws {
        self.directory = directory
        let arguments = [binary, "--socket", directory + "/s.sock", "--state-dir", directory + "/state", "--ram-budget", ramBudget] + extra
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, directory + "/kvtierd.log", O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO)
        posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0)
        let argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        var environment = ProcessInfo.processInfo.environment
        environment["NOTIFY_SOCKET"] = notifySocket
        environment.removeValue(forKey: "WATCHDOG_USEC")
        let envp: [UnsafeMutablePointer<CChar>?] = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { for pointer in envp { free(pointer) } }
        // As systemd starts it: no blocked signals (the test thread blocks nearly all).
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attributes, &empty)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK))
        var child: pid_t = 0
        let status = posix_spawn(&child, binary, &actions, &attributes, argv, envp)
        guard status == 0 else { throw TestFailure("posix_spawn \(binary): errno \(status)") }
        pid = child
    }

    /// SIGTERM, up to 60 s for a clean exit, then SIGKILL. Returns the wait status. The folder
    /// is removed unless `keepingFiles` (for a restart).
    @discardableResult
    func stop(keepingFiles: Bool = false) -> Int32 {
        guard !stopped else { return 0 }
        stopped = true
        _ = kill(pid, SIGTERM)
        var status: Int32 = 0
        var exited = false
        // Up to 60 s for a clean stop (a loaded machine flushes RAM pages slowly), waiting on
        // the pidfd rather than in a sleep loop.
        let pidfd = Self.pidDescriptor(pid)
        defer { if pidfd >= 0 { close(pidfd) } }
        let deadline = ContinuousClock.now + .seconds(60)
        while ContinuousClock.now < deadline {
            if waitpid(pid, &status, WNOHANG) == pid {
                exited = true
                break
            }
            var fds = [pollfd(fd: pidfd, events: Int16(POLLIN), revents: 0)]
            if pidfd >= 0 { _ = poll(&fds, 1, 1000) } else { usleep(50_000) }
        }
        if !exited {
            _ = kill(pid, SIGKILL)
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        }
        if !keepingFiles { try? FileManager.default.removeItem(atPath: directory) }
        return status
    }

    /// SIGKILL, as a crash or the OOM killer would: no clean stop. Keeps the folder.
    func crash() {
        guard !stopped else { return }
        stopped = true
        _ = kill(pid, SIGKILL)
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    }

    /// Removes the folder of a daemon stopped with `keepingFiles` or crashed.
    func removeFiles() {
        try? FileManager.default.removeItem(atPath: directory)
    }

    deinit { stop() }

    func logTail(lines: Int = 20) -> String {
        guard let file = fopen(logPath, "r") else { return "(no log)" }
        defer { fclose(file) }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = fread(&buffer, 1, buffer.count, file)
            if n <= 0 { break }
            bytes += buffer[0..<n]
        }
        return String(decoding: bytes, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
    }

    private static func parent(_ path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }
}
