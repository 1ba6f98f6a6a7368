@preconcurrency import Glibc
import Foundation
import KVTierClient
import KVTierTestProcess
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
        let notify = try NotifySocket(path: directory + "/ready-\(UInt32.random(in: 0...UInt32.max)).notify")
        let daemon = try DaemonProcess(binary: binary, directory: directory, ramBudget: ramBudget, extra: arguments, notifySocket: notify.path)
        switch await notify.awaitMessage(containing: "READY=1", from: daemon.pid, seconds: Double(readyDeadlineSeconds)) {
        case .arrived:
            return daemon
        case .exited:
            var status: Int32 = 0
            _ = waitpid(daemon.pid, &status, 0)
            daemon.stopped = true
            throw TestFailure("kvtierd exited with status \(status) before READY=1:\n\(daemon.logTail())")
        case .deadline:
            throw TestFailure("kvtierd sent no READY=1 within \(readyDeadlineSeconds) s:\n\(daemon.logTail())")
        }
    }

    private init(binary: String, directory: String, ramBudget: String, extra: [String], notifySocket: String) throws {
        self.directory = directory
        let arguments = [binary, "--socket", directory + "/s.sock", "--state-dir", directory + "/state", "--ram-budget", ramBudget] + extra
        var environment = ProcessInfo.processInfo.environment
        environment["NOTIFY_SOCKET"] = notifySocket
        environment.removeValue(forKey: "WATCHDOG_USEC")
        pid = try ChildSpawn.spawn(arguments, environment: environment, logPath: directory + "/kvtierd.log")
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
        if EventWaits.exit(of: pid, until: Date().addingTimeInterval(60)) {
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            exited = true
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
