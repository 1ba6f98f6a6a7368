@preconcurrency import Glibc
@testable import KVTierDaemon
import Testing

/// The pure parts of kvtierd's operations code, in process: address parsing, systemd's
/// environment rules, and how counters become Prometheus samples.
@Suite struct OperationsUnitTests {
    typealias Endpoint = DaemonConfiguration.MetricsEndpoint

    @Test func metricsEndpointParsing() {
        #expect(Endpoint.parse("127.0.0.1:9464") == Endpoint(host: "127.0.0.1", port: 9464, isLoopback: true))
        #expect(Endpoint.parse("127.3.4.5:0")?.isLoopback == true)
        #expect(Endpoint.parse("localhost:80") == Endpoint(host: "127.0.0.1", port: 80, isLoopback: true))
        #expect(Endpoint.parse("[::1]:9464") == Endpoint(host: "::1", port: 9464, isLoopback: true))
        #expect(Endpoint.parse("[::1]:9464")?.description == "[::1]:9464")
        #expect(Endpoint.parse("0.0.0.0:9464")?.isLoopback == false)
        #expect(Endpoint.parse("10.1.2.3:9464")?.isLoopback == false)
        #expect(Endpoint.parse("[::]:9464")?.isLoopback == false)
        for bad in ["", "9464", "127.0.0.1", "127.0.0.1:", "127.0.0.1:65536", "127.0.0.1:-1", "::1:9464", "example.com:80",
                    "127.0.0.256:1", "[::1]"] {
            #expect(Endpoint.parse(bad) == nil, "\(bad) parsed")
        }
    }

    @Test func nonLoopbackNeedsTheFlag() throws {
        var settings = DaemonConfiguration()
        settings.stateDir = "/tmp/x"
        settings.metricsListen = "0.0.0.0:9464"
        #expect(throws: DaemonConfiguration.Invalid.self) { try settings.resolved() }
        settings.metricsAllowNonLoopback = true
        #expect(try settings.resolved().metricsListen?.host == "0.0.0.0")
        settings.metricsListen = ""
        #expect(try settings.resolved().metricsListen == nil, "empty is off")
    }

    @Test func watchdogRules() {
        let pid: pid_t = 4242
        #expect(SystemdNotifier.watchdogInterval(environment: ["WATCHDOG_USEC": "30000000"], processID: pid) == 15_000_000)
        #expect(SystemdNotifier.watchdogInterval(environment: ["WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"], processID: pid) == 15_000_000)
        #expect(SystemdNotifier.watchdogInterval(environment: ["WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"], processID: pid) == nil)
        #expect(SystemdNotifier.watchdogInterval(environment: ["WATCHDOG_USEC": "0"], processID: pid) == nil)
        #expect(SystemdNotifier.watchdogInterval(environment: ["WATCHDOG_USEC": "soon"], processID: pid) == nil)
        #expect(SystemdNotifier.watchdogInterval(environment: [:], processID: pid) == nil)
    }

    @Test func listenDescriptorRules() {
        let pid: pid_t = 4242
        #expect(SystemdListenDescriptors.passed(environment: ["LISTEN_PID": "4242", "LISTEN_FDS": "1"], processID: pid) == [3])
        #expect(SystemdListenDescriptors.passed(environment: ["LISTEN_PID": "4242", "LISTEN_FDS": "2"], processID: pid) == [3, 4])
        #expect(SystemdListenDescriptors.passed(environment: ["LISTEN_PID": "1", "LISTEN_FDS": "1"], processID: pid).isEmpty,
                "sockets meant for another process")
        #expect(SystemdListenDescriptors.passed(environment: ["LISTEN_FDS": "1"], processID: pid).isEmpty)
        #expect(SystemdListenDescriptors.passed(environment: ["LISTEN_PID": "4242", "LISTEN_FDS": "0"], processID: pid).isEmpty)
    }

    /// The notifier's datagrams, sent to a socket of ours in the abstract namespace.
    @Test func notifierSendsToAbstractSockets() throws {
        let name = "kvtier-notify-test-\(getpid())"
        let receiver = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        defer { close(receiver) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in for (i, b) in name.utf8.enumerated() { raw[i + 1] = b } }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + 1 + name.utf8.count)
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(receiver, $0, length) } }
        try #require(bound == 0, "bind: errno \(errno)")
        let notifier = SystemdNotifier(environment: ["NOTIFY_SOCKET": "@" + name], logger: .init(label: "test"))
        notifier.ready(status: "testing")
        var buffer = [UInt8](repeating: 0, count: 256)
        var timeout = timeval(tv_sec: 2, tv_usec: 0)
        _ = setsockopt(receiver, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let n = buffer.withUnsafeMutableBytes { recv(receiver, $0.baseAddress, $0.count, 0) }
        try #require(n > 0)
        #expect(String(decoding: buffer[0..<n], as: UTF8.self) == "READY=1\nSTATUS=testing")
        #expect(SystemdNotifier(environment: [:], logger: .init(label: "test")).address == nil, "no NOTIFY_SOCKET: silent")
    }

    @Test func countersBecomeSamples() {
        let metrics = DaemonMetrics(ioPath: "pread", diskBudgetBytes: 1 << 30, startTimeSeconds: 1)
        func text() -> String { String(decoding: metrics.exposition(), as: UTF8.self) }
        metrics.refresh([("puts", 5), ("ram_pages", 7), ("future_thing", 3), ("server.connections.open", 2)])
        #expect(text().contains("\nkvtier_puts_total 5\n"))
        #expect(text().contains("kvtier_tier_pages{tier=\"ram\"} 7.0"))
        #expect(text().contains("\nkvtier_store_future_thing 3.0\n"), "an unmapped status value is still exported")
        #expect(text().contains("\nkvtier_clients 2.0\n"))
        #expect(text().contains("kvtier_io_path{path=\"pread\"} 1.0") && text().contains("kvtier_io_path{path=\"io_uring\"} 0.0"))
        #expect(text().contains("kvtier_tier_budget_bytes{tier=\"disk\"} 1073741824.0"))
        metrics.refresh([("puts", 5)])
        #expect(text().contains("\nkvtier_puts_total 5\n"), "a second scrape of the same value adds nothing")
        metrics.refresh([("puts", 9)])
        #expect(text().contains("\nkvtier_puts_total 9\n"))
        metrics.refresh([("puts", 2)])
        #expect(text().contains("\nkvtier_puts_total 2\n"), "a counter that went back (a restarted source) restarts too")
    }
}
