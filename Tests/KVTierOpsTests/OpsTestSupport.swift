@preconcurrency import Glibc
import Foundation
import KVTierClient
import KVTierTestProcess
import Testing

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Paths of this checkout and of the binaries the tests start.
enum Checkout {
    static let root: String = {
        var path = #filePath
        for _ in 0..<3 { path = String(path[..<path.lastIndex(of: "/")!]) }
        return path
    }()

    /// `$KVTIER_DAEMON`, else `.build/debug/kvtierd`.
    static let daemon: String? = binary(environment: "KVTIER_DAEMON", name: "kvtierd")
    /// `$KVTIER_CLI`, else `.build/debug/kvtier`.
    static let cli: String? = binary(environment: "KVTIER_CLI", name: "kvtier")

    static let missingBinaries: Comment = "kvtierd or kvtier not built: swift build --build-tests (or set KVTIER_DAEMON, KVTIER_CLI)"
    static var binariesBuilt: Bool { daemon != nil && cli != nil }

    private static func binary(environment: String, name: String) -> String? {
        var candidates: [String] = []
        if let explicit = getenv(environment) { candidates.append(String(cString: explicit)) }
        candidates.append(root + "/.build/debug/" + name)
        return candidates.first { access($0, X_OK) == 0 }
    }

    /// The first executable `name` on PATH (or the usual system folders).
    static func tool(_ name: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        let folders = path.split(separator: ":").map(String.init) + ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        return folders.map { $0 + "/" + name }.first { access($0, X_OK) == 0 }
    }
}

/// A fresh temporary folder, removed by `remove()`.
struct TemporaryFolder {
    let path: String

    init(_ prefix: String = "kvtier-ops") throws {
        var template = Array("/tmp/\(prefix)-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw TestFailure("mkdtemp: errno \(errno)") }
        path = String(cString: made)
    }

    func remove() { try? FileManager.default.removeItem(atPath: path) }

    func write(_ name: String, _ text: String) throws -> String {
        let file = path + "/" + name
        try text.write(toFile: file, atomically: true, encoding: .utf8)
        return file
    }
}

/// A child process with stdout and stderr in one log file and stdin from /dev/null.
final class ChildProcess {
    let pid: pid_t
    let logPath: String
    private var exitStatus: Int32?

    init(_ arguments: [String], environment: [String: String]? = nil, logPath: String) throws {
        self.logPath = logPath
        pid = try ChildSpawn.spawn(arguments, environment: environment ?? ProcessInfo.processInfo.environment, logPath: logPath)
    }

    /// The exit status once the process ended, without waiting.
    func poll() -> Int32? {
        if let exitStatus { return exitStatus }
        var status: Int32 = 0
        if waitpid(pid, &status, WNOHANG) == pid { exitStatus = status }
        return exitStatus
    }

    /// Waits up to `seconds` for the process to end (on its pidfd, no sleep loop); its wait
    /// status, or nil on timeout. Blocks the calling thread: async tests use `awaitExit`.
    func wait(seconds: Double) -> Int32? {
        if let status = poll() { return status }
        _ = EventWaits.exit(of: pid, until: Date().addingTimeInterval(seconds))
        return poll()
    }

    func signal(_ number: Int32) { if poll() == nil { _ = kill(pid, number) } }

    /// SIGTERM, up to 5 s, then SIGKILL.
    @discardableResult
    func stop() -> Int32 {
        if let status = poll() { return status }
        signal(SIGTERM)
        if let status = wait(seconds: 5) { return status }
        _ = kill(pid, SIGKILL)
        return wait(seconds: 5) ?? -1
    }

    deinit { stop() }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// Waits up to `seconds` until the log contains `text`.
    func waitForLog(_ text: String, seconds: Double = 10) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if log.contains(text) { return true }
            usleep(20_000)
        }
        return log.contains(text)
    }
}

/// Decodes a wait status as the shell would print it.
func exitCode(_ status: Int32) -> Int32 { (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f) }

/// Runs a command to completion; its exit code and combined output.
func runToCompletion(_ arguments: [String], environment: [String: String]? = nil, timeoutSeconds: Double = 60) throws -> (code: Int32, output: String) {
    let folder = try TemporaryFolder("kvtier-run")
    defer { folder.remove() }
    let child = try ChildProcess(arguments, environment: environment, logPath: folder.path + "/out")
    guard let status = child.wait(seconds: timeoutSeconds) else {
        child.stop()
        throw TestFailure("\(arguments.joined(separator: " ")) did not finish in \(timeoutSeconds) s:\n\(child.log)")
    }
    return (exitCode(status), child.log)
}

/// A kvtierd started with `arguments` (socket and state under `folder`), waiting until it is
/// ready: READY=1 on a NOTIFY_SOCKET of the test's own (sent once the socket listens), then one
/// PING. Event-driven with a deadline only a stuck daemon reaches, so a loaded machine is slow
/// but never fails here.
func startDaemon(in folder: TemporaryFolder, _ arguments: [String] = []) async throws -> ChildProcess {
    guard let daemon = Checkout.daemon else { throw TestFailure("\(Checkout.missingBinaries)") }
    let socket = folder.path + "/s.sock"
    let notify = try NotifySocket(path: folder.path + "/ready-\(UInt32.random(in: 0...UInt32.max)).notify")
    var environment = ProcessInfo.processInfo.environment
    environment["NOTIFY_SOCKET"] = notify.path
    environment.removeValue(forKey: "WATCHDOG_USEC")
    let child = try ChildProcess([daemon, "--socket", socket, "--state-dir", folder.path + "/state", "--ram-budget", "64MiB"] + arguments,
                                 environment: environment, logPath: folder.path + "/kvtierd.log")
    try await waitUntilServing(socket: socket, child: child, notify: notify)
    return child
}

/// Waits for READY=1 on `notify`, then checks the daemon answers a PING on `socket`.
func waitUntilServing(socket: String, child: ChildProcess, notify: NotifySocket) async throws {
    guard try await notify.awaitMessage(containing: "READY=1", child: child) else {
        throw TestFailure("kvtierd sent no READY=1 within \(Int(EventWaits.stuckSeconds)) s:\n\(child.log)")
    }
    let client = try await KVTierClient.connect(socketPath: socket, mapSharedMemory: false, replyTimeoutSeconds: 60)
    try await client.ping()
    await client.close()
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
func freeLoopbackPort() throws -> UInt16 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw TestFailure("socket: errno \(errno)") }
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let ok = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
    }
    guard ok else { throw TestFailure("bind 127.0.0.1:0: errno \(errno)") }
    return UInt16(bigEndian: address.sin_port)
}

/// One HTTP/1.1 request to 127.0.0.1:`port`; the status code and body.
func httpRequest(port: UInt16, method: String = "GET", path: String) throws -> (status: Int, body: String) {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw TestFailure("socket: errno \(errno)") }
    defer { close(fd) }
    // Generous: under the whole suite on two cores a scrape has taken more than 5 s.
    var timeout = timeval(tv_sec: 30, tv_usec: 0)
    _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = port.bigEndian
    address.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
    let connected = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard connected == 0 else { throw TestFailure("connect 127.0.0.1:\(port): errno \(errno)") }
    let request = Array("\(method) \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".utf8)
    var sent = 0
    while sent < request.count {
        let n = request[sent...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { throw TestFailure("send to 127.0.0.1:\(port): errno \(errno)") }
        sent += n
    }
    var response: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        if n < 0 && errno == EINTR { continue }  // a signal to this test process, not the end of the response
        guard n > 0 else { break }
        response += chunk[0..<n]
    }
    let text = String(decoding: response, as: UTF8.self)
    guard let headEnd = text.range(of: "\r\n\r\n") else { throw TestFailure("no HTTP response head in \(text.prefix(200))") }
    let statusLine = text[..<headEnd.lowerBound].split(separator: "\r\n").first ?? ""
    let parts = statusLine.split(separator: " ")
    guard parts.count >= 2, let status = Int(parts[1]) else { throw TestFailure("bad status line \(statusLine)") }
    return (status, String(text[headEnd.upperBound...]))
}

/// Prometheus text: the value of the sample whose name and labels are exactly `series`
/// (e.g. `kvtier_tier_pages{tier="ram"}`).
func sample(_ series: String, in exposition: String) -> Double? {
    for line in exposition.split(separator: "\n") where !line.hasPrefix("#") {
        guard let space = line.lastIndex(of: " ") else { continue }
        if line[..<space] == series { return Double(line[line.index(after: space)...]) }
    }
    return nil
}
