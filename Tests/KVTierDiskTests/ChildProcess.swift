@preconcurrency import Glibc
import Foundation
import KVTierTestProcess

/// The `kvtier` executable that `swift build` / `swift test` put beside the test bundle.
enum KVTierBinary {
    /// Environment variable naming the binary explicitly (e.g. a release build).
    static let environmentVariable = "KVTIER_BINARY"

    /// Where the binary is, or nil with the places looked at.
    static func locate() -> (path: String?, searched: [String]) {
        var candidates: [String] = []
        if let explicit = getenv(environmentVariable) { candidates.append(String(cString: explicit)) }
        // The test bundle (…/debug/KVTierPackageTests.xctest) sits in the build folder that holds
        // the package's executables.
        for start in [CommandLine.arguments.first, executablePath()].compactMap({ $0 }) {
            var directory = parent(start)
            // Also one level up, for bundles that are directories (Contents/MacOS/…).
            for _ in 0..<4 {
                candidates.append(directory + "/kvtier")
                directory = parent(directory)
            }
        }
        // From the source tree: <repo>/Tests/KVTierDiskTests/ChildProcess.swift → <repo>/.build/debug.
        let repository = parent(parent(parent(#filePath)))
        candidates.append(repository + "/.build/debug/kvtier")
        for candidate in candidates where access(candidate, X_OK) == 0 {
            var info = stat()
            if stat(candidate, &info) == 0, info.st_mode & S_IFMT == S_IFREG { return (candidate, candidates) }
        }
        return (nil, candidates)
    }

    private static func parent(_ path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    private static func executablePath() -> String? {
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard n > 0 else { return nil }
        return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// A child process started with posix_spawn, its output appended to a log file.
final class ChildProcess {
    let pid: pid_t
    let logPath: String
    private var reaped: Int32?

    /// Starts `executable` with `arguments` (through `ChildSpawn`: clean signal mask, nothing of
    /// the test process inherited); stdout and stderr go to `logPath` (appended).
    init(_ executable: String, _ arguments: [String], logPath: String) throws {
        self.logPath = logPath
        do {
            pid = try ChildSpawn.spawn([executable] + arguments, environment: ProcessInfo.processInfo.environment, logPath: logPath)
        } catch {
            throw TestFailure(error.description)
        }
    }

    /// The wait status if the child has already exited, without blocking.
    func exitedOnItsOwn() -> Int32? {
        if let reaped { return reaped }
        var status: Int32 = 0
        let got = waitpid(pid, &status, WNOHANG)
        if got == pid { reaped = status }
        return reaped
    }

    /// SIGKILL, then reap. Returns the wait status.
    @discardableResult
    func kill() -> Int32 {
        if let reaped { return reaped }
        _ = Glibc.kill(pid, SIGKILL)
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        reaped = status
        return status
    }

    /// Waits for a normal exit (bounded by the caller's own timeout logic). Returns the wait status.
    func wait() -> Int32 {
        if let reaped { return reaped }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        reaped = status
        return status
    }

    deinit { if reaped == nil { kill() } }

    /// "exit 3" or "signal 9" for a wait status.
    static func describe(_ status: Int32) -> String {
        status & 0x7F == 0 ? "exit \((status >> 8) & 0xFF)" : "signal \(status & 0x7F)"
    }

    /// The last `lines` lines of the log, for failure messages.
    func logTail(lines: Int = 20) -> String {
        guard let bytes = readWholeFile(logPath) else { return "(no log)" }
        let all = String(decoding: bytes, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false)
        return all.suffix(lines).joined(separator: "\n")
    }
}
