@preconcurrency import Glibc
import Foundation
import KVTierCore
import KVTierProtocol
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
                    # A refused connection is answered and closed at once: the send or the
                    # read after the answer may meet a reset.
                    s.sendall(bytes.fromhex(sys.argv[2]))
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
                    refused.append(data[20:].decode(errors="replace") if data else "(reset)")
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
            try? input.fileHandleForWriting.close()
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
        try? input.fileHandleForWriting.close()
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
    /// their body is read: with room for one, a second stalled frame waits unread and is cut
    /// at the frame timeout with an error naming the budget, while the bytes buffered never
    /// exceed the budget.
    @Test func stalledLargeFramesStayWithinTheFrameBudget() async throws {
        var configuration = ServerConfiguration()
        configuration.maxInlineBody = 256 << 10
        configuration.maxBufferedFrameBytes = (256 << 10) + 16
        configuration.maxBufferedFrameBytesPerUID = (256 << 10) + 16
        configuration.frameTimeout = .seconds(2)
        let harness = try TestServer(configuration: configuration)
        let header = rawHeader(bodyBytes: 256 << 10, opcode: Opcode.put.rawValue, flags: 0, requestID: 9)
        let first = try TestClient(path: harness.path)
        _ = try await first.hello()
        let second = try TestClient(path: harness.path)
        _ = try await second.hello()
        try first.send(header + [UInt8](repeating: 1, count: 128 << 10))
        #expect(await harness.eventually { harness.server.frameBudget.usedBytes == (256 << 10) + 16 })
        try second.send(header + [UInt8](repeating: 2, count: 16 << 10))
        // The second frame is not admitted: the first holds the whole budget until it is cut.
        let (frame, _) = try await second.readFrame()
        let reply = try Reply.decode(frame)
        #expect(wireError(of: reply) == .timeout)
        if case .error(_, let error) = reply { #expect(error.message.contains("maxBufferedFrameBytes"), "\(error.message)") }
        #expect(harness.server.frameBudget.usedBytes <= (256 << 10) + 16)
        #expect(await first.isClosedByServer())
        #expect(await harness.eventually { harness.server.frameBudget.usedBytes == 0 }, "closing a connection returns its reservation")
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
