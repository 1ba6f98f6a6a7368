import KVTierClient
import KVTierCore
import KVTierProtocol
import Testing

/// The client's VRAM directory calls against a real kvtierd (skipped when none is built): the
/// daemon only keeps books, so no GPU is needed. The pool lives as long as its connection.
@Suite(.serialized, .enabled(if: DaemonProcess.binary != nil, DaemonProcess.skipReason))
struct VramDaemonTests {
    @Test func aPoolIsPlacedCommittedLeasedAndEndsWithItsConnection() async throws {
        var random = SplitMix64(seed: testSeed("VramDaemonTests.aPoolIsPlacedCommittedLeasedAndEndsWithItsConnection"))
        let daemon = try await DaemonProcess.start()
        defer { daemon.stop() }
        let client = try await KVTierClient.connect(socketPath: daemon.socketPath, clientName: "vram-tests")
        let owner = try await KVTierClient.connect(socketPath: daemon.socketPath, clientName: "vram-pool-owner", mapSharedMemory: false)
        let model = try await client.registerModel(DaemonTests.spec)
        let tokens = DaemonTests.randomTokens(40, &random)  // pages of 16, 16 and 8
        let kv = DaemonTests.randomKV(tokens: 40, &random)
        #expect(try await client.put(model, tokens: tokens, keys: kv.keys, values: kv.values) == 40)

        let pageBytes = 16 * DaemonTests.spec.shape.bytesPerToken
        let handle: [UInt8] = [0xC0, 0xDA, 0x01]
        let pool = try await owner.vramRegisterPool(deviceUUID: "GPU-00000000-test", slots: 4, slotBytes: pageBytes, handle: handle)
        #expect(try await client.lookup(model, tokens: tokens).vramTokens == 0)
        let placed = try await client.vramPlace(model, poolID: pool, tokens: tokens)
        #expect(placed.pages.map(\.tokens) == [16, 16, 8] && placed.residentTokens == 0)
        try await client.vramCommit(leaseID: placed.leaseID)
        let found = try await client.lookup(model, tokens: tokens)
        #expect(found.cachedTokens == 40 && found.vramTokens == 40)

        let lent = try await client.vramLease(model, tokens: tokens)
        #expect(lent.poolID == pool && lent.handle == handle && lent.deviceUUID == "GPU-00000000-test" && lent.tokens == 40)
        #expect(lent.pages.map(\.slot) == placed.pages.map(\.slot))
        try await client.release(leaseID: lent.leaseID)
        do {
            try await client.vramCommit(leaseID: placed.leaseID)
            Issue.record("a placement was committed twice")
        } catch let error as KVTierClientError {
            #expect(error.wireError == .notFound, "\(error)")
        }
        await #expect(throws: KVTierClientError.self, "the client refuses an empty UUID before sending it") {
            _ = try await owner.vramRegisterPool(deviceUUID: "", slots: 1, slotBytes: 1, handle: [1])
        }

        await owner.close()
        // The daemon forgets the pool once it has seen the connection close (it does so after
        // `close` returns: poll, up to a deadline).
        let deadline = Clocks.monotonicMicros() + 10_000_000
        var left = try await client.lookup(model, tokens: tokens).vramTokens
        while left != 0, Clocks.monotonicMicros() < deadline {
            try await Task.sleep(for: .milliseconds(5))
            left = try await client.lookup(model, tokens: tokens).vramTokens
        }
        #expect(left == 0, "the owner's pool outlived its connection")
        #expect(try await client.vramLease(model, tokens: tokens) == .none)
        await client.close()
    }
}
