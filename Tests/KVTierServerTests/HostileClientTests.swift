@preconcurrency import Glibc
import Foundation
import KVTierCore
import KVTierProtocol
import KVTierSystem
import SystemPackage
import Testing
@testable import KVTierServer

/// Clients that try to take the transport from others: too many sockets from one uid, sockets
/// that never say HELLO or never speak again, and frames stalled half-sent.
@Suite struct HostileClientTests {
    /// uid 65534 opens more connections than `maxConnectionsPerUID` and holds them; another
    /// uid (root, this test) still connects and is served. Before the limit one uid could take
    /// all `maxConnections` slots.
    @Test(.enabled(if: getuid() == 0 && access("/usr/bin/setpriv", X_OK) == 0 && access("/usr/bin/python3", X_OK) == 0,
                   "needs root, setpriv and /usr/bin/python3 to run a client as another uid"))
    func oneUIDCannotTakeEveryConnection() async throws {
        var configuration = ServerConfiguration()
        configuration.maxConnections = 24
        configuration.maxConnectionsPerUID = 8
        let harness = try TestServer(configuration: configuration)
        let hello = try Request.hello(Hello(capabilities: [], clientName: "hog")).encodeFrame(requestID: 1)
        // Opens 30 connections, says HELLO on each, reads each answer, reports the error
        // messages and the count served, then holds them until stdin closes.
        let script = """
            import socket, struct, sys
            held, refused = [], []
            for _ in range(30):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(60)
                s.connect(sys.argv[1])
                data = b""
                try:
                    # A refused connection is answered and closed at once, maybe before our
                    # HELLO is sent: read the answer even when sending failed.
                    s.sendall(bytes.fromhex(sys.argv[2]))
                except OSError:
                    pass
                try:
                    while len(data) < 16 or len(data) < 16 + struct.unpack("<I", data[:4])[0]:
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                except OSError:
                    pass
                status = struct.unpack("<I", data[12:16])[0] if len(data) >= 16 else None
                if status == 0:
                    held.append(s)
                else:
                    refused.append(data[18:].decode(errors="replace") if data else "(reset)")
            print(len(held), flush=True)
            print(([r for r in refused if r != "(reset)"] or [""])[0], flush=True)
            sys.stdin.read()
            """
        let hog = Process()
        hog.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
        hog.arguments = ["--reuid", "65534", "--regid", "65534", "--clear-groups", "/usr/bin/python3", "-c", script,
                         harness.path, hello.map { String(format: "%02x", $0) }.joined()]
        let output = Pipe()
        let input = Pipe()
        hog.standardOutput = output
        hog.standardInput = input
        try hog.run()
        defer {
            // Ended by SIGKILL, not by the EOF on its stdin nor by SIGTERM: a child another test
            // spawns at the same moment can inherit the pipe's write end and keep it open, and
            // Process starts the hog with the test thread's signal mask, which blocks SIGTERM.
            // Either way the hog never exited and waitUntilExit here blocked a thread of the
            // cooperative pool for good, stalling the whole parallel suite.
            kill(hog.processIdentifier, SIGKILL)
            hog.waitUntilExit()
        }
        let lines = try await onThread { () -> [String] in
            var text = ""
            while text.split(separator: "\n", omittingEmptySubsequences: false).count < 3 {
                let chunk = output.fileHandleForReading.availableData
                if chunk.isEmpty { break }
                text += String(decoding: chunk, as: UTF8.self)
            }
            return text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        }
        #expect(lines.first == "8", "uid 65534 held \(lines.first ?? "?") connections; the limit is 8")
        #expect(lines.count > 1 && lines[1].contains("maxConnectionsPerUID"), "refusal names the limit: \(lines)")

        // Root (another uid) is still served while uid 65534 holds its connections.
        let client = try TestClient(path: harness.path)
        let reply = try await client.hello()
        #expect(reply.tenant == TenantID(getuid()))
        let (status, _, _) = try await client.call(.status)
        #expect(wireError(of: status) == nil)
        #expect(harness.server.counters.value(of: "server.connections.rejected_per_uid") == 22)
        try await harness.stop()
    }

    /// A connection that never sends HELLO is answered with a timeout error and closed.
    @Test func noHelloWithinTheHandshakeTimeoutCloses() async throws {
        var configuration = ServerConfiguration()
        configuration.handshakeTimeout = .milliseconds(300)
        let harness = try TestServer(configuration: configuration)
        let silent = try TestClient(path: harness.path)
        let (frame, _) = try await silent.readFrame()
        let reply = try Reply.decode(frame)
        #expect(wireError(of: reply) == .timeout)
        if case .error(_, let error) = reply { #expect(error.message.contains("handshakeTimeout")) }
        #expect(await silent.isClosedByServer())
        #expect(harness.server.counters.value(of: "server.connections.handshake_timeouts") == 1)
        try await harness.stop()
    }

    /// After HELLO, a connection idle past `idleTimeout` is closed; one in use is not.
    @Test func idleConnectionsAreClosed() async throws {
        var configuration = ServerConfiguration()
        configuration.idleTimeout = .milliseconds(500)
        let harness = try TestServer(configuration: configuration)
        let idle = try TestClient(path: harness.path)
        _ = try await idle.hello()
        #expect(await idle.isClosedByServer())
        #expect(harness.server.counters.value(of: "server.connections.idle_timeouts") == 1)
        try await harness.stop()
    }

    /// Frames larger than the receive buffer reserve their size in the frame budget before
    /// their body is read: with room for one, a second frame waits unread (the budget never
    /// exceeded) until the first completes, then is admitted; a stalled one is cut at the frame
    /// timeout and its reservation returned.
    @Test func largeFramesWaitForRoomInTheFrameBudget() async throws {
        let frameBytes = (256 << 10) + 16
        var configuration = ServerConfiguration()
        configuration.maxInlineBody = 256 << 10
        configuration.maxBufferedFrameBytes = frameBytes
        configuration.maxBufferedFrameBytesPerUID = frameBytes
        configuration.frameTimeout = .seconds(30)
        let harness = try TestServer(configuration: configuration)
        let budget = harness.server.frameBudget
        let header = rawHeader(bodyBytes: 256 << 10, opcode: Opcode.put.rawValue, flags: 0, requestID: 9)
        let first = try TestClient(path: harness.path)
        _ = try await first.hello()
        let second = try TestClient(path: harness.path)
        _ = try await second.hello()
        try await first.sendAll(header + [UInt8](repeating: 1, count: 128 << 10))
        #expect(await harness.eventually { budget.usedBytes == frameBytes })
        try await second.sendAll(header + [UInt8](repeating: 2, count: 16 << 10))
        #expect(await harness.eventually { budget.framesWaiting == 1 }, "the second frame waits for room")
        #expect(budget.usedBytes == frameBytes)
        // The first frame completes (its reply: the test handler cannot parse this PUT): its
        // reservation returns and the waiting frame is admitted.
        try await first.sendAll([UInt8](repeating: 1, count: 128 << 10))
        _ = try await first.readFrame()
        #expect(await harness.eventually { budget.framesWaiting == 0 && budget.usedBytes == frameBytes }, "the waiting frame was admitted")
        try await second.sendAll([UInt8](repeating: 2, count: (256 << 10) - (16 << 10)))
        _ = try await second.readFrame()
        #expect(await harness.eventually { budget.usedBytes == 0 }, "answered frames return their reservations")
        try await harness.stop()
    }

    /// A frame that cannot get room before the frame timeout is cut with an error naming the
    /// budget, and the socket is never read past its header. Per-uid room smaller than the
    /// frame makes the wait certain (the daemon's configuration refuses such a setting).
    @Test func frameNeverAdmittedIsCutWithTheBudgetNamed() async throws {
        var configuration = ServerConfiguration()
        configuration.maxInlineBody = 256 << 10
        configuration.maxBufferedFrameBytes = 1 << 20
        configuration.maxBufferedFrameBytesPerUID = 128 << 10
        configuration.frameTimeout = .milliseconds(500)
        let harness = try TestServer(configuration: configuration)
        let client = try TestClient(path: harness.path)
        _ = try await client.hello()
        try client.send(rawHeader(bodyBytes: 256 << 10, opcode: Opcode.put.rawValue, flags: 0, requestID: 9) + [UInt8](repeating: 3, count: 1000))
        let (frame, _) = try await client.readFrame()
        let reply = try Reply.decode(frame)
        #expect(wireError(of: reply) == .timeout)
        if case .error(_, let error) = reply {
            #expect(error.message.contains("maxBufferedFrameBytes") && error.message.contains("maxBufferedFrameBytesPerUID"), "\(error.message)")
        }
        #expect(await client.isClosedByServer())
        #expect(harness.server.frameBudget.usedBytes == 0 && harness.server.frameBudget.framesWaiting == 0)
        try await harness.stop()
    }

    /// The watchdog's probe: answered by a running accept loop, refused once it stopped.
    @Test func livenessProbeFollowsTheAcceptLoop() async throws {
        let harness = try TestServer()
        #expect(await harness.eventually { harness.server.livenessProbe() && harness.server.probesAnswered.load(ordering: .relaxed) > 0 })
        #expect(await harness.eventually { harness.server.livenessProbe() })
        try await harness.stop()
        #expect(!harness.server.livenessProbe())
    }
}

extension TestClient {
    /// Sends every byte, waiting (off the cooperative pool, up to 60 s) while the socket is
    /// full: the server may not read a frame it has no room for yet.
    func sendAll(_ bytes: [UInt8]) async throws {
        try await onThread {
            var offset = 0
            let deadline = ContinuousClock.now + .seconds(60)
            while offset < bytes.count {
                let attempt = bytes.withUnsafeBytes { raw in
                    Result { () throws(Errno) -> Int in
                        try self.socket.sendMessage(UnsafeRawBufferPointer(rebasing: raw[offset...]), wait: false)
                    }
                }
                switch attempt {
                case .success(let sent):
                    offset += sent
                case .failure(let error) where error == .resourceTemporarilyUnavailable:
                    guard ContinuousClock.now < deadline else { throw TestFailure("the server read nothing for 60 s") }
                    var fds = [pollfd(self.socket, events: Int16(POLLOUT))]
                    _ = try Poll.wait(&fds, timeoutMillis: 1000)
                case .failure(let error):
                    throw error
                }
            }
        }
    }
}
