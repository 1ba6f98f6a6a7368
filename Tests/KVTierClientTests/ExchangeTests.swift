import KVTierClient
import KVTierCore
import KVTierProtocol
import Testing

/// How the client exchanges requests with a real kvtierd: on the calling thread when the reply
/// is quick, on its queue when it is not, one at a time per connection, with `RELEASE`s sent
/// without waiting.
@Suite(.serialized, .enabled(if: DaemonProcess.binary != nil, DaemonProcess.skipReason))
struct ExchangeTests {
    typealias Daemon = DaemonTests

    /// Every lease a GET took is released by the time a later request is answered, though no
    /// `RELEASE` was waited for.
    @Test func leasedPagesAreReleasedBeforeTheNextRequest() async throws {
        let seed = testSeed("ExchangeTests.leasedPagesAreReleasedBeforeTheNextRequest")
        var random = SplitMix64(seed: seed)
        let daemon = try await DaemonProcess.start()
        defer { daemon.stop() }
        let client = try await KVTierClient.connect(socketPath: daemon.socketPath)
        let model = try await client.registerModel(Daemon.spec)
        let tokens = Daemon.randomTokens(40, &random)
        let kv = Daemon.randomKV(tokens: 40, &random)
        #expect(try await client.put(model, tokens: tokens, keys: kv.keys, values: kv.values) == 40)
        for round in 0..<50 {
            let got = try await client.get(model, tokens: tokens)
            #expect(got.keys == kv.keys && got.values == kv.values, "round \(round), seed \(seed)")
        }
        // More releases outstanding than the client keeps unanswered: it drains them itself.
        for _ in 0..<40 {
            try await client.withLeasedPages(model, tokens: tokens) { leased in #expect(leased.tokens == 40) }
        }
        let status = try await client.status()
        #expect(status["leases"] == 0, "leases left: \(status["leases"] ?? 0)")
        #expect(status["gets"] == 90)
        await client.close()
    }

    /// Tasks sharing one connection each get their own replies.
    @Test func concurrentCallersShareAConnection() async throws {
        let seed = testSeed("ExchangeTests.concurrentCallersShareAConnection")
        var random = SplitMix64(seed: seed)
        let daemon = try await DaemonProcess.start()
        defer { daemon.stop() }
        let client = try await KVTierClient.connect(socketPath: daemon.socketPath)
        let model = try await client.registerModel(Daemon.spec)
        var sequences: [(tokens: [UInt32], keys: [UInt16], values: [UInt16])] = []
        for length in [16, 23, 40, 57] {
            let tokens = Daemon.randomTokens(length, &random)
            let kv = Daemon.randomKV(tokens: length, &random)
            sequences.append((tokens, kv.keys, kv.values))
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for (index, sequence) in sequences.enumerated() {
                group.addTask {
                    #expect(try await client.put(model, tokens: sequence.tokens, keys: sequence.keys, values: sequence.values)
                            == sequence.tokens.count)
                    for round in 0..<25 {
                        let got = try await client.get(model, tokens: sequence.tokens)
                        #expect(got.tokens == sequence.tokens.count && got.keys == sequence.keys && got.values == sequence.values,
                                "sequence \(index), round \(round), seed \(seed)")
                        #expect(try await client.lookup(model, tokens: sequence.tokens).cachedTokens == sequence.tokens.count)
                    }
                }
            }
            try await group.waitForAll()
        }
        #expect(try await client.status()["leases"] == 0)
        await client.close()
    }

    /// Pages evicted to disk come back through the daemon's async path (a promotion), whose
    /// replies may take longer than the client waits on the calling thread.
    @Test(arguments: [true, false])
    func pagesFromDiskComeBackTheSameEachTime(sharedMemory: Bool) async throws {
        let seed = testSeed("ExchangeTests.pagesFromDiskComeBackTheSameEachTime(sharedMemory: \(sharedMemory))")
        var random = SplitMix64(seed: seed)
        let daemon = try await DaemonProcess.start(ramBudget: "1MiB")
        defer { daemon.stop() }
        let client = try await KVTierClient.connect(socketPath: daemon.socketPath, mapSharedMemory: sharedMemory)
        let model = try await client.registerModel(Daemon.spec)
        // 8 KiB pages: 4000 tokens are 250 pages, 2 MiB, twice the RAM budget.
        let tokens = Daemon.randomTokens(4000, &random)
        let kv = Daemon.randomKV(tokens: 4000, &random)
        #expect(try await client.put(model, tokens: tokens, keys: kv.keys, values: kv.values) == 4000)
        let lookup = try await client.lookup(model, tokens: tokens)
        #expect(lookup.cachedTokens == 4000 && lookup.diskTokens > 0, "\(lookup)")
        // The disk codec is lossy (k4v4), so pages from disk are compared with themselves: a
        // second GET (pages now promoted, or evicted and promoted again) serves the same bytes.
        // A GET leases no more than the tenant's RAM quota (here the whole budget, 1 MiB: 128
        // pages of 16 tokens), so it serves that prefix (docs/security.md).
        let got = try await client.get(model, tokens: tokens)
        #expect(got.tokens == 2048)
        let again = try await client.get(model, tokens: tokens)
        #expect(again.tokens == 2048 && again.keys == got.keys && again.values == got.values, "seed \(seed)")
        let status = try await client.status()
        #expect(status["promotions"]! > 0 && status["leases"] == 0)
        await client.close()
    }
}
