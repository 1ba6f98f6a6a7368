@preconcurrency import Glibc
import Foundation
import KVTierIO
import Logging
import KVTierTestProcess
import Testing
@testable import KVTierDaemon
@testable import KVTierServer
@testable import KVTierStore

/// The systemd watchdog proves the daemon alive without the store: its pings go on while the
/// store's lock is held (as behind a long request), so systemd never kills a daemon that is
/// slow but serving.
@Suite(.serialized) struct WatchdogTests {
    @Test func pingsContinueWhileTheStoreLockIsHeld() async throws {
        let folder = try TemporaryFolder("kvtier-watchdog")
        defer { folder.remove() }
        let notify = try NotifySocket(path: folder.path + "/notify")
        let logger = Logger(label: "kvtier.ops.tests") { _ in SwiftLogNoOpLogHandler() }
        var settings = DaemonConfiguration()
        settings.stateDir = folder.path + "/state"
        settings.socket = folder.path + "/s.sock"
        let configuration = try settings.resolved()
        let operations = try DaemonOperations(configuration: configuration, ioPath: .preadPool(threads: 1), reload: nil, logLevel: nil, logger: logger,
                                              environment: ["NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"])
        let store = TieredStore(configuration: TieredStore.Configuration(), disk: nil, logger: logger) { tenant in
            try ArenaPageMemory(name: "kvtier-watchdog-test-\(tenant)", capacity: 16 << 20, stagingCapacity: 4 << 20, logger: logger)
        }
        let server = KVServer(listener: try UnixListener(path: configuration.socket),
                              handler: StoreRequestHandler(store: store, defaultPageTokens: 16), logger: logger)
        let running = Task { try await server.run() }

        // Hold the store's lock, as a long request would, until the test has its pings.
        let release = DispatchSemaphore(value: 0)
        let held = DispatchSemaphore(value: 0)
        Thread {
            store.state.withLock { _ in
                held.signal()
                _ = release.wait(timeout: .now() + 120)
            }
        }.start()
        held.wait()
        operations.started(store: store, vram: VramDirectory(heatHalfLifeMicros: store.heatHalfLifeMicros), server: server, status: "test")
        let descriptor = notify.descriptor
        let pings = await EventWaits.onThread {
            EventWaits.count(on: descriptor, of: "WATCHDOG=1", upTo: 4, seconds: 30)
        }
        release.signal()
        #expect(pings >= 4, "only \(pings) WATCHDOG=1 pings in 30 s while the store lock was held (interval 100 ms)")
        operations.stopping()
        server.shutdown()
        try await running.value
    }
}

extension EventWaits {
    /// Counts datagrams equal to `message` on `descriptor` until `count` came or `seconds` passed.
    static func count(on descriptor: Int32, of message: String, upTo count: Int, seconds: Double) -> Int {
        var seen = 0
        let deadline = Date().addingTimeInterval(seconds)
        var buffer = [UInt8](repeating: 0, count: 4096)
        while seen < count, Date() < deadline {
            guard !poll([descriptor], until: deadline).isEmpty else { continue }
            let n = buffer.withUnsafeMutableBytes { recv(descriptor, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n > 0, String(decoding: buffer[0..<n], as: UTF8.self) == message { seen += 1 }
        }
        return seen
    }
}
