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
    private var stopped = false

    /// Starts the daemon and waits (up to 30 s) until it answers a PING. `reusing` restarts a
    /// stopped daemon's folder (its socket path and state directory).
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
        let daemon = try DaemonProcess(binary: binary, directory: directory, ramBudget: ramBudget, extra: arguments)
        for _ in 0..<600 {
            if let client = try? await KVTierClient.connect(socketPath: daemon.socketPath, replyTimeoutSeconds: 10) {
                try await client.ping()
                await client.close()
                return daemon
            }
            var status: Int32 = 0
            if waitpid(daemon.pid, &status, WNOHANG) == daemon.pid {
                daemon.stopped = true
                throw TestFailure("kvtierd exited with status \(status) before listening:\n\(daemon.logTail())")
            }
            usleep(50_000)
        }
        throw TestFailure("kvtierd did not answer on \(daemon.socketPath) within 30 s:\n\(daemon.logTail())")
    }

    private init(binary: String, directory: String, ramBudget: String, extra: [String]) throws {
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
        var child: pid_t = 0
        let status = posix_spawn(&child, binary, &actions, nil, argv, environ)
        guard status == 0 else { throw TestFailure("posix_spawn \(binary): errno \(status)") }
        pid = child
    }

    /// SIGTERM, up to 5 s for a clean exit, then SIGKILL. Returns the wait status. The folder
    /// is removed unless `keepingFiles` (for a restart).
    @discardableResult
    func stop(keepingFiles: Bool = false) -> Int32 {
        guard !stopped else { return 0 }
        stopped = true
        _ = kill(pid, SIGTERM)
        var status: Int32 = 0
        var exited = false
        for _ in 0..<100 {
            if waitpid(pid, &status, WNOHANG) == pid {
                exited = true
                break
            }
            usleep(50_000)
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
