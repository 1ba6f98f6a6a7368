@preconcurrency import Glibc
import Foundation
import KVTierClient
import KVTierCore
import KVTierTestProcess
import Testing

/// The systemd units as shipped, and kvtierd under systemd's protocols without a running
/// systemd: `systemd-analyze verify` on the units, `systemd-socket-activate` passing the socket,
/// and a datagram socket standing in for NOTIFY_SOCKET.
///
/// The systemd tools come from Debian's `systemd` package, which scripts/install-deps installs.
/// Without them these tests fail, unless KVTIER_ALLOW_NO_SYSTEMD=1 says to skip them.
@Suite(.serialized, .enabled(if: Checkout.binariesBuilt, Checkout.missingBinaries))
struct SystemdTests {
    static let allowMissingTools = ProcessInfo.processInfo.environment["KVTIER_ALLOW_NO_SYSTEMD"] == "1"
    static var toolsPresent: Bool { Checkout.tool("systemd-analyze") != nil && Checkout.tool("systemd-socket-activate") != nil }
    static let unitsFolder = Checkout.root + "/systemd"

    /// The systemd tool `name`, or a failure that says how to get it.
    static func requireTool(_ name: String) throws -> String {
        guard let path = Checkout.tool(name) else {
            throw TestFailure("\(name) not found: run scripts/install-deps (Debian package systemd), or set KVTIER_ALLOW_NO_SYSTEMD=1 to skip")
        }
        return path
    }

    static func readUnit(_ name: String) throws -> String {
        try String(contentsOfFile: unitsFolder + "/" + name, encoding: .utf8)
    }

    /// Copies both units into a fresh folder with ExecStart pointing at this checkout's kvtierd
    /// (verify checks that the binary exists), optionally edited, and runs `systemd-analyze verify`.
    static func verify(editing edit: (String) -> String = { $0 }) throws -> (code: Int32, output: String) {
        let analyze = try requireTool("systemd-analyze")
        let folder = try TemporaryFolder("kvtier-units")
        defer { folder.remove() }
        let service = edit(try readUnit("kvtierd.service").replacingOccurrences(of: "/usr/local/bin/kvtierd", with: Checkout.daemon!))
        let servicePath = try folder.write("kvtierd.service", service)
        let socketPath = try folder.write("kvtierd.socket", try readUnit("kvtierd.socket"))
        return try runToCompletion([analyze, "verify", socketPath, servicePath])
    }

    @Test(.enabled(if: toolsPresent || !allowMissingTools, "systemd tools missing and KVTIER_ALLOW_NO_SYSTEMD=1"))
    func unitsPassSystemdAnalyzeVerify() throws {
        let result = try Self.verify()
        #expect(result.code == 0, "systemd-analyze verify failed:\n\(result.output)")
        let complaints = result.output.split(separator: "\n").filter { $0.contains("kvtierd.") }
        #expect(complaints.isEmpty, "systemd-analyze verify warns about the units:\n\(complaints.joined(separator: "\n"))")

        // The check can fail: a misspelt value is reported.
        let broken = try Self.verify { $0.replacingOccurrences(of: "Type=notify", with: "Type=notfy") }
        #expect(broken.output.contains("notfy"), "verify did not notice a broken Type=:\n\(broken.output)")
    }

    @Test func unitsAgreeWithTheDaemon() throws {
        let service = try Self.readUnit("kvtierd.service")
        let socket = try Self.readUnit("kvtierd.socket")
        func values(_ key: String, in unit: String) -> [String] {
            unit.split(separator: "\n").compactMap { line in
                line.hasPrefix(key + "=") ? String(line.dropFirst(key.count + 1)) : nil
            }
        }
        #expect(values("ListenStream", in: socket) == [KVTierPaths.systemSocketPath])
        #expect(try KVTierPaths.defaultSocketPath(environment: [:], uid: 0) == KVTierPaths.systemSocketPath)
        #expect(values("Type", in: service) == ["notify"])
        #expect(values("RuntimeDirectory", in: service) == ["kvtier"])
        #expect(values("StateDirectory", in: service) == ["kvtier"])
        #expect(values("Restart", in: service) == ["on-failure"])
        #expect(!values("WatchdogSec", in: service).isEmpty)
        let execStart = values("ExecStart", in: service).first ?? ""
        #expect(execStart.contains("--socket \(KVTierPaths.systemSocketPath)"), "ExecStart: \(execStart)")
        #expect(execStart.contains("--state-dir /var/lib/kvtier"), "ExecStart: \(execStart)")
        #expect(try KVTierPaths.defaultStateDirectory(environment: [:], uid: 0) == "/var/lib/kvtier")
    }

    /// Hardening must leave io_uring and memfd alone: the only syscall filter is a deny list,
    /// and none of its groups (as this systemd defines them) contains those calls.
    @Test(.enabled(if: toolsPresent || !allowMissingTools, "systemd tools missing and KVTIER_ALLOW_NO_SYSTEMD=1"))
    func syscallFilterKeepsIOURingAndMemfd() throws {
        let analyze = try Self.requireTool("systemd-analyze")
        let service = try Self.readUnit("kvtierd.service")
        let filters = service.split(separator: "\n").filter { $0.hasPrefix("SystemCallFilter=") }
        let needed = ["io_uring_setup", "io_uring_enter", "io_uring_register", "memfd_create", "mmap", "sendmsg"]
        for filter in filters {
            let value = filter.dropFirst("SystemCallFilter=".count)
            #expect(value.hasPrefix("~"), "an allow-list filter would have to name every call the runtime makes: \(filter)")
            for entry in value.dropFirst().split(separator: " ") {
                let calls: [Substring]
                if entry.hasPrefix("@") {
                    let listing = try runToCompletion([analyze, "syscall-filter", String(entry)])
                    #expect(listing.code == 0, "systemd-analyze syscall-filter \(entry): \(listing.output)")
                    calls = listing.output.split(whereSeparator: { $0 == "\n" || $0 == " " })
                    #expect(calls.count > 1, "group \(entry) lists no calls")
                } else {
                    calls = [entry]
                }
                for call in needed { #expect(!calls.contains(Substring(call)), "\(filter) denies \(call) (via \(entry))") }
            }
        }
    }

    static let spec = ModelSpecification(name: "ops-test", layers: 2, kvHeads: 2, headDim: 32, elementType: .float16,
                                         pageTokens: 16, ropeTheta: 10_000)

    @Test(.enabled(if: toolsPresent || !allowMissingTools, "systemd tools missing and KVTIER_ALLOW_NO_SYSTEMD=1"))
    func socketActivationServesClientsAndNotifiesReadyWatchdogStopping() async throws {
        let activate = try Self.requireTool("systemd-socket-activate")
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let notify = try NotifySocket(path: folder.path + "/notify")
        let activated = folder.path + "/activated.sock"
        let unused = folder.path + "/unused.sock"
        // systemd-socket-activate listens, then execs kvtierd in its own process on the first
        // connection, with LISTEN_PID/LISTEN_FDS naming fd 3.
        let daemon = try ChildProcess(
            [activate, "-l", activated, "-E", "NOTIFY_SOCKET=\(notify.path)", "-E", "WATCHDOG_USEC=400000",
             Checkout.daemon!, "--socket", unused, "--state-dir", folder.path + "/state", "--ram-budget", "64MiB"],
            logPath: folder.path + "/kvtierd.log")
        defer { daemon.stop() }
        for _ in 0..<100 where access(activated, F_OK) != 0 { usleep(20_000) }

        let client = try await KVTierClient.connect(socketPath: activated, replyTimeoutSeconds: 30)
        try await client.ping()
        let model = try await client.registerModel(Self.spec)
        let lookup = try await client.lookup(model, tokens: [1, 2, 3])
        #expect(lookup.cachedTokens == 0)
        await client.close()

        let messages = notify.receive(until: { $0.contains("READY=1") }, seconds: 15)
        #expect(messages.contains { $0.contains("READY=1") }, "no READY=1; got \(messages)\n\(daemon.log)")
        #expect(messages.first?.hasPrefix("STATUS=") == true, "a STATUS= line while starting; got \(messages)")
        let pings = notify.receive(until: { $0 == "WATCHDOG=1" }, seconds: 3)
        #expect(pings.contains("WATCHDOG=1"), "no WATCHDOG=1 with WATCHDOG_USEC set; got \(pings)")
        #expect(access(unused, F_OK) != 0, "kvtierd bound --socket instead of serving the passed socket")
        #expect(daemon.log.contains("serving the socket passed by systemd"), "\(daemon.log)")

        // A second client on the same passed socket.
        let second = try await KVTierClient.connect(socketPath: activated, mapSharedMemory: false)
        #expect(try await second.status()["models"] == 1)
        await second.close()

        daemon.signal(SIGTERM)
        let stopping = notify.receive(until: { $0.contains("STOPPING=1") }, seconds: 10)
        #expect(stopping.contains { $0.contains("STOPPING=1") }, "no STOPPING=1 on SIGTERM; got \(stopping)")
        let status = daemon.wait(seconds: 10)
        #expect(status.map(exitCode) == 0, "exit after SIGTERM: \(String(describing: status))\n\(daemon.log)")
    }

    /// WATCHDOG_PID naming another process means the watchdog is not ours: no pings. READY=1
    /// still arrives, without socket activation.
    @Test func watchdogForAnotherProcessSendsNoPings() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let notify = try NotifySocket(path: folder.path + "/notify")
        var environment = ProcessInfo.processInfo.environment
        environment["NOTIFY_SOCKET"] = notify.path
        environment["WATCHDOG_USEC"] = "100000"
        environment["WATCHDOG_PID"] = "1"
        let daemon = try ChildProcess(
            [Checkout.daemon!, "--socket", folder.path + "/s.sock", "--state-dir", folder.path + "/state", "--ram-budget", "64MiB"],
            environment: environment, logPath: folder.path + "/kvtierd.log")
        defer { daemon.stop() }
        let ready = notify.receive(until: { $0.contains("READY=1") }, seconds: 15)
        #expect(ready.contains { $0.contains("READY=1") }, "no READY=1; got \(ready)\n\(daemon.log)")
        let later = notify.receive(until: { _ in false }, seconds: 1)
        #expect(!later.contains("WATCHDOG=1") && !ready.contains("WATCHDOG=1"), "pinged a watchdog meant for pid 1: \(later)")
    }

    /// A passed socket that is not a listening stream socket is refused, with a message.
    @Test(.enabled(if: toolsPresent || !allowMissingTools, "systemd tools missing and KVTIER_ALLOW_NO_SYSTEMD=1"))
    func passedDatagramSocketIsRefused() throws {
        let activate = try Self.requireTool("systemd-socket-activate")
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let path = folder.path + "/dgram.sock"
        let daemon = try ChildProcess(
            [activate, "--datagram", "-l", path, Checkout.daemon!, "--socket", folder.path + "/unused.sock",
             "--state-dir", folder.path + "/state", "--ram-budget", "64MiB"],
            logPath: folder.path + "/kvtierd.log")
        defer { daemon.stop() }
        for _ in 0..<100 where access(path, F_OK) != 0 { usleep(20_000) }
        let sender = try NotifySocket(path: folder.path + "/sender")
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in for (i, b) in path.utf8.enumerated() { raw[i] = b } }
        let sent = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(sender.descriptor, "x", 1, 0, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        #expect(sent == 1, "sendto: errno \(errno)")
        let status = daemon.wait(seconds: 15)
        #expect(status.map(exitCode).map { $0 != 0 } == true, "kvtierd served a datagram socket: \(String(describing: status))\n\(daemon.log)")
        #expect(daemon.log.contains("not a listening Unix stream socket"), "\(daemon.log)")
    }
}
