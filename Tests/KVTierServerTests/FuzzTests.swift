@preconcurrency import Glibc
import KVTierCore
import KVTierProtocol
import Testing
@testable import KVTierServer

@Suite("Server fuzz")
struct FuzzTests {
    /// Valid traffic to mutate: HELLO then requests, as a client would send them.
    private static func validStream() throws -> [UInt8] {
        try Request.hello(Hello(capabilities: .sharedMemory, clientName: "fuzz")).encodeFrame(requestID: 1)
            + Request.ping.encodeFrame(requestID: 2)
            + Request.status.encodeFrame(requestID: 3)
            + Request.lookup(Lookup(modelID: 9, tokens: [1, 2, 3])).encodeFrame(requestID: 4)
    }

    private static func input(_ random: inout SplitMix64, valid: [UInt8]) -> [UInt8] {
        switch random.next() % 3 {
        case 0:  // Pure noise.
            return (0..<Int(random.next() % 96)).map { _ in UInt8(truncatingIfNeeded: random.next()) }
        case 1:  // Valid traffic with a few bytes flipped.
            var bytes = valid
            for _ in 0..<(1 + random.next() % 4) {
                bytes[Int(random.next() % UInt64(bytes.count))] ^= UInt8(truncatingIfNeeded: random.next() | 1)
            }
            return bytes
        default:  // Valid traffic cut short, or with noise appended.
            let cut = Int(random.next() % UInt64(valid.count))
            return Array(valid[..<cut]) + (0..<Int(random.next() % 24)).map { _ in UInt8(truncatingIfNeeded: random.next()) }
        }
    }

    @Test("500 random and mutated byte strings on fresh connections: each is closed, the server stays up and answers PING")
    func randomInput() async throws {
        let seed = UInt64.random(in: .min ... .max)
        print("FuzzTests.randomInput seed \(seed)")
        var random = SplitMix64(seed: seed)
        let harness = try TestServer()
        let valid = try Self.validStream()
        for round in 0..<500 {
            let bytes = Self.input(&random, valid: valid)
            let client = try TestClient(path: harness.path)
            try? client.send(bytes)  // The server may already have closed: EPIPE is fine.
            client.shutdownSending()
            #expect(await client.isClosedByServer(timeout: .seconds(30)), "seed \(seed) round \(round): connection not closed")
        }
        let client = try TestClient(path: harness.path)
        _ = try await client.hello()
        #expect(try await client.call(.ping).reply == .ping)
        #expect(await harness.eventually { harness.server.openConnections == 1 })
        #expect(harness.server.counters.value(of: "server.connections.accepted") == 501)
        let protocolErrors = harness.server.counters.value(of: "server.errors.protocol") ?? 0
        #expect(protocolErrors > 250, "most inputs must reach the error paths, not just end the stream (\(protocolErrors))")
        try await harness.stop()
    }
}
