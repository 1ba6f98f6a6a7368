@preconcurrency import Glibc
import KVTierCore
import KVTierProtocol
import Testing
@testable import KVTierServer

@Suite("KVServer")
struct ServerTests {
    @Test("HELLO negotiates the current version and the tenant is the peer's uid; PING echoes its request id")
    func helloAndPing() async throws {
        let harness = try TestServer()
        let client = try TestClient(path: harness.path)
        let hello = try await client.hello()
        #expect(hello.version == ProtocolVersion.current)
        #expect(hello.tenant == TenantID(getuid()))
        #expect(hello.capabilities == [])
        #expect(hello.arenaBytes == 0)
        #expect(hello.maxControlBody == UInt32(ProtocolLimits.maxControlBody))
        let (reply, requestID, descriptors) = try await client.call(.ping, requestID: 0xDEAD_BEEF)
        #expect(reply == .ping)
        #expect(requestID == 0xDEAD_BEEF)
        #expect(descriptors.isEmpty)
        try await harness.stop()
    }

    @Test("requests before HELLO, and a second HELLO, get outOfOrder and the connection stays open")
    func outOfOrder() async throws {
        let harness = try TestServer()
        let client = try TestClient(path: harness.path)
        #expect(wireError(of: try await client.call(.ping).reply) == .outOfOrder)
        #expect(wireError(of: try await client.call(.status).reply) == .outOfOrder)
        #expect(harness.handler.log.contexts.withLock { $0.isEmpty }, "no request reaches the handler before HELLO")
        _ = try await client.hello()
        let again = try await client.call(.hello(Hello(capabilities: [], clientName: "again"))).reply
        #expect(wireError(of: again) == .outOfOrder)
        #expect(again.opcode == Opcode.hello.rawValue)
        #expect(try await client.call(.ping).reply == .ping)
        try await harness.stop()
    }

    @Test("a HELLO with no common version gets unsupportedVersion; a later valid HELLO succeeds")
    func unsupportedVersion() async throws {
        let harness = try TestServer()
        let client = try TestClient(path: harness.path)
        let future = try await client.call(.hello(Hello(minVersion: 7, maxVersion: 9, capabilities: [], clientName: "future"))).reply
        #expect(wireError(of: future) == .unsupportedVersion)
        let inverted = try await client.call(.hello(Hello(minVersion: 2, maxVersion: 1, capabilities: [], clientName: "inverted"))).reply
        #expect(wireError(of: inverted) == .unsupportedVersion)
        #expect(try await client.hello().version == ProtocolVersion.current)
        try await harness.stop()
    }

    @Test("STATUS reaches the handler with the connection's context and returns the server's counters; closing calls connectionClosed")
    func statusThroughHandler() async throws {
        let harness = try TestServer()
        let idle = try TestClient(path: harness.path)
        _ = try await idle.hello()
        var client: TestClient? = try TestClient(path: harness.path)
        _ = try await client!.hello()
        guard case .status(let status) = try await client!.call(.status).reply else { throw TestFailure("STATUS failed") }
        let counters = Dictionary(uniqueKeysWithValues: status.counters.map { ($0.name, $0.value) })
        #expect(counters["server.connections.open"] == 2)
        #expect(counters["server.connections.accepted"] == 2)
        #expect(counters["server.frames.received"] == 3)
        #expect(wireError(of: try await client!.call(.sessionList(ListPage())).reply) == .invalidArgument)
        let context = try #require(harness.handler.log.contexts.withLock { $0.first })
        #expect(context.tenant == TenantID(getuid()))
        #expect(context.peer == PeerCredentials(pid: getpid(), uid: getuid(), gid: getgid()))
        #expect(context.clientName == "kvtier-server-tests")
        #expect(!context.sharedMemory)
        client = nil
        #expect(await harness.eventually { harness.handler.log.closed.withLock { $0.map(\.connectionID) } == [context.connectionID] })
        #expect(await harness.eventually { harness.server.openConnections == 1 })
        #expect(try await idle.call(.ping).reply == .ping)
        try await harness.stop()
        #expect(harness.handler.log.closed.withLock { $0.count } == 2)
    }

    enum BadInput: String, CaseIterable {
        case undefinedFlags, oversizeBody, truncatedBody, bodyThatDoesNotParse
    }

    @Test("a malformed frame gets an error reply and closes its connection; other clients keep working", arguments: BadInput.allCases)
    func malformedFrame(_ input: BadInput) async throws {
        let harness = try TestServer()
        let bystander = try TestClient(path: harness.path)
        _ = try await bystander.hello()
        let client = try TestClient(path: harness.path)
        _ = try await client.hello()
        let expected: WireError
        switch input {
        case .undefinedFlags:
            try client.send(rawHeader(bodyBytes: 0, opcode: Opcode.ping.rawValue, flags: 0x8000, requestID: 41))
            expected = .malformed
        case .oversizeBody:
            try client.send(rawHeader(bodyBytes: UInt32(ProtocolLimits.maxControlBody + 1), opcode: Opcode.ping.rawValue, flags: 0, requestID: 41))
            expected = .tooLarge
        case .truncatedBody:
            try client.send(rawHeader(bodyBytes: 100, opcode: Opcode.status.rawValue, flags: 0, requestID: 41) + [UInt8](repeating: 7, count: 50))
            client.shutdownSending()
            expected = .malformed
        case .bodyThatDoesNotParse:
            try client.send(rawHeader(bodyBytes: 3, opcode: Opcode.ping.rawValue, flags: 0, requestID: 41) + [1, 2, 3])
            expected = .malformed
        }
        let (frame, _) = try await client.readFrame()
        #expect(frame.header.requestID == 41, "the error reply echoes the header that was read")
        #expect(wireError(of: try Reply.decode(frame)) == expected)
        #expect(await client.isClosedByServer())
        #expect(try await bystander.call(.ping).reply == .ping)
        #expect(await harness.eventually { harness.server.openConnections == 1 })
        try await harness.stop()
    }

    @Test("an unknown opcode gets unknownOpcode and the connection stays open")
    func unknownOpcode() async throws {
        let harness = try TestServer()
        let client = try TestClient(path: harness.path)
        _ = try await client.hello()
        try client.send(rawHeader(bodyBytes: 4, opcode: 0x7777, flags: 0, requestID: 9) + [0, 0, 0, 0])
        let (frame, _) = try await client.readFrame()
        #expect(frame.header.opcode == 0x7777)
        #expect(wireError(of: try Reply.decode(frame)) == .unknownOpcode)
        #expect(try await client.call(.ping).reply == .ping)
        try await harness.stop()
    }

    @Test("a client that stalls mid-frame is answered with timeout and disconnected; an idle one is not")
    func frameTimeout() async throws {
        var configuration = ServerConfiguration()
        configuration.frameTimeout = .milliseconds(300)
        let harness = try TestServer(configuration: configuration)
        let idle = try TestClient(path: harness.path)
        _ = try await idle.hello()
        let slow = try TestClient(path: harness.path)
        _ = try await slow.hello()
        let started = ContinuousClock.now
        try slow.send(Array(try Request.ping.encodeFrame(requestID: 5)[..<8]))
        let (frame, _) = try await slow.readFrame(timeout: .seconds(30))
        let elapsed = ContinuousClock.now - started
        #expect(wireError(of: try Reply.decode(frame)) == .timeout)
        #expect(frame.header.requestID == 0, "only half a header came, so there is no request id to echo")
        #expect(elapsed >= .milliseconds(290) && elapsed < .seconds(20), "timed out after \(elapsed)")
        #expect(await slow.isClosedByServer())
        #expect(harness.server.counters.value(of: "server.errors.frame_timeout") == 1)
        #expect(try await idle.call(.ping).reply == .ping, "idling between frames is never timed")
        try await harness.stop()
    }

    @Test("connections over maxConnections get a tooLarge reply and are closed; a freed slot is reused")
    func connectionLimit() async throws {
        var configuration = ServerConfiguration()
        configuration.maxConnections = 2
        let harness = try TestServer(configuration: configuration)
        let first = try TestClient(path: harness.path)
        _ = try await first.hello()
        var second: TestClient? = try TestClient(path: harness.path)
        _ = try await second!.hello()
        let third = try TestClient(path: harness.path)
        let (frame, _) = try await third.readFrame()
        #expect(frame.header.opcode == Opcode.hello.rawValue)
        #expect(wireError(of: try Reply.decode(frame)) == .tooLarge)
        #expect(await third.isClosedByServer())
        #expect(harness.server.counters.value(of: "server.connections.rejected") == 1)
        second = nil
        #expect(await harness.eventually { harness.server.openConnections == 1 })
        let fourth = try TestClient(path: harness.path)
        #expect(try await fourth.hello().version == ProtocolVersion.current)
        try await harness.stop()
    }

    @Test("shutdown lets a request in progress finish, closes idle connections and removes the socket file")
    func gracefulShutdown() async throws {
        // The busy request finishes only when the test opens the gate, so "idle connections
        // close at once, the busy one after its request" is checked by order, not by timing.
        var configuration = ServerConfiguration()
        configuration.shutdownGracePeriod = .seconds(300)
        let gate = Gate()
        let harness = try TestServer(configuration: configuration, releaseGate: gate)
        let idle = try TestClient(path: harness.path)
        _ = try await idle.hello()
        let busy = try TestClient(path: harness.path)
        _ = try await busy.hello()
        try busy.send(try Request.release(Release(leaseID: 1)).encodeFrame(requestID: 77))
        #expect(await harness.eventually { harness.handler.log.contexts.withLock { !$0.isEmpty } })
        harness.server.shutdown()
        #expect(await idle.isClosedByServer(timeout: .seconds(60)))
        gate.open()
        let (frame, _) = try await busy.readFrame()
        #expect(try Reply.decode(frame) == .release)
        #expect(frame.header.requestID == 77)
        #expect(await busy.isClosedByServer())
        try await harness.running.value
        var status = stat()
        #expect(lstat(harness.path, &status) == -1 && errno == ENOENT)
        #expect(harness.handler.log.closed.withLock { $0.count } == 2)
        harness.directory.remove()
    }

    @Test("cancelling the task that runs the server shuts it down")
    func cancellation() async throws {
        let harness = try TestServer()
        let client = try TestClient(path: harness.path)
        _ = try await client.hello()
        harness.running.cancel()
        try await harness.running.value
        #expect(await client.isClosedByServer())
        harness.directory.remove()
    }
}
