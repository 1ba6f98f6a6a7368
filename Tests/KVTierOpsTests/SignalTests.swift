@preconcurrency import Glibc
import Foundation
import KVTierCore
import KVTierTestProcess
import Testing
@testable import KVTierDaemon

/// Signals kvtierd must never lose: a SIGTERM that arrives right after READY=1 (systemd may
/// stop a service the moment it is ready) must stop the daemon cleanly, every time.
@Suite(.serialized, .enabled(if: Checkout.binariesBuilt, Checkout.missingBinaries))
struct SignalTests {
    static let rounds = 48

    /// 48 socket-activated starts (a client connecting starts kvtierd, as systemd would); each
    /// waits for READY=1 on a stand-in NOTIFY_SOCKET and sends SIGTERM at once. Before the fix
    /// about 1 start in 12 ignored the signal (it came before the dispatch signal source was
    /// registered, while SIGTERM was set to SIG_IGN) and the daemon ran on.
    @Test(.enabled(if: SystemdTests.toolsPresent || !SystemdTests.allowMissingTools, "systemd tools missing and KVTIER_ALLOW_NO_SYSTEMD=1"))
    func sigtermRightAfterReadyStopsTheDaemonEveryTime() async throws {
        let activate = try SystemdTests.requireTool("systemd-socket-activate")
        let folder = try TemporaryFolder("kvtier-sigterm")
        defer { folder.remove() }
        var environment = ProcessInfo.processInfo.environment
        environment.removeValue(forKey: "WATCHDOG_USEC")
        var lost: [String] = []
        let seed = UInt64.random(in: 0...UInt64.max)
        print("sigtermRightAfterReady: seed \(seed)")
        var random = SplitMix64(seed: seed)
        for round in 0..<Self.rounds {
            let notifyPath = folder.path + "/notify-\(round)"
            let notify = try NotifySocket(path: notifyPath)
            let activated = folder.path + "/a-\(round).sock"
            let child = try ChildProcess(
                [activate, "-l", activated, "-E", "NOTIFY_SOCKET=\(notifyPath)",
                 Checkout.daemon!, "--socket", folder.path + "/unused.sock", "--state-dir", folder.path + "/state-\(round)", "--ram-budget", "16MiB"],
                environment: environment, logPath: folder.path + "/kvtierd-\(round).log")
            // The first connection makes systemd-socket-activate exec kvtierd.
            let trigger = try await connectWhenBound(activated, child: child)
            defer { close(trigger) }
            let ready = try await notify.awaitMessage(containing: "READY=1", child: child)
            #expect(ready, "round \(round): no READY=1\n\(child.log)")
            // Right after READY=1, or up to 20 ms later (seeded): the window in which the
            // signal was lost lies somewhere in the daemon's first milliseconds of serving.
            try await Task.sleep(for: .microseconds(Int.random(in: 0...20_000, using: &random)))
            child.signal(SIGTERM)
            // Generous: a loaded two-core machine; a lost signal never ends, so this only
            // bounds the failure.
            let status = try await child.awaitExit(seconds: 30)
            if status.map(exitCode) != 0 || !child.log.contains("stopping on signal") {
                lost.append("round \(round): status \(String(describing: status.map(exitCode)))\n\(child.log)")
                child.stop()
            }
        }
        #expect(lost.isEmpty, "SIGTERM after READY=1 lost in \(lost.count) of \(Self.rounds) starts (seed \(seed)):\n\(lost.joined(separator: "\n"))")
    }
}

/// Connects to `path` once systemd-socket-activate has bound it (it binds before this test can
/// know; the file appears within milliseconds). Returns the connected descriptor.
func connectWhenBound(_ path: String, child: ChildProcess) async throws -> Int32 {
    let deadline = Date().addingTimeInterval(EventWaits.stuckSeconds)
    while Date() < deadline {
        let descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in for (i, b) in path.utf8.enumerated() { raw[i] = b } }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if connected == 0 { return descriptor }
        close(descriptor)
        if let status = child.poll() { throw TestFailure("systemd-socket-activate exited (\(exitCode(status))):\n\(child.log)") }
        // The socket file does not exist yet: no event to wait on but its creation.
        try await Task.sleep(for: .milliseconds(10))
    }
    throw TestFailure("\(path) was not bound within \(Int(EventWaits.stuckSeconds)) s:\n\(child.log)")
}

/// The mechanism in process: a signal raised the moment `SignalWatcher.init` returns reaches
/// the handler. Before the fix the watcher set the signal to SIG_IGN and registered its
/// dispatch source later, on another thread, so a signal this early was usually discarded.
@Suite(.serialized) struct SignalWatcherTests {
    @Test func aSignalRightAfterInstallingIsDelivered() async throws {
        for round in 0..<20 {
            let delivered = AsyncStream<Int32>.makeStream()
            let watcher = SignalWatcher(signals: [SIGUSR2]) { number in delivered.continuation.yield(number) }
            defer { watcher.cancel() }
            kill(getpid(), SIGUSR2)
            let timeout = Task {
                try await Task.sleep(for: .seconds(30))
                delivered.continuation.finish()
            }
            var iterator = delivered.stream.makeAsyncIterator()
            let got = await iterator.next()
            timeout.cancel()
            #expect(got == SIGUSR2, "round \(round): SIGUSR2 raised right after SignalWatcher.init never reached the handler")
            if got == nil { return }
        }
    }
}
