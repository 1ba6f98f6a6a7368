@preconcurrency import Glibc
import Foundation
import KVTierClient
import KVTierCore
import KVTierTestProcess
import Testing

/// Two kvtierd, each with its own state directory (two hosts), sharing one real redis-server
/// through the remote tier: pages one evicts are hits on the other, bit for bit; with Redis
/// killed, both keep serving their local tiers.
@Suite(.serialized, .enabled(if: Checkout.binariesBuilt, Checkout.missingBinaries),
       .disabled(if: RedisServer.unavailableReason != nil, "neither redis-server nor valkey-server is on PATH (scripts/install-deps installs redis-server)"))
struct RemoteTierDaemonTests {
    static let spec = ModelSpecification(name: "remote-test", layers: 2, kvHeads: 2, headDim: 32, elementType: .float16, pageTokens: 16,
                                         ropeTheta: 10_000)

    /// A key file (0600) and a config naming `redis` as the remote tier, in `folder`.
    static func configure(_ folder: TemporaryFolder, redis: RedisServer, key: String, extra: String = "") throws -> String {
        let keyFile = try folder.write("remote.key", key + "\n")
        chmod(keyFile, 0o600)
        return try folder.write("kvtierd.json", """
            {"remoteURL": "unix://\(redis.socketPath)", "remoteKeyFile": "\(keyFile)", "remotePages": "all",
             "remoteTimeoutMillis": 250, "diskCodec": "fp16"\(extra)}
            """)
    }

    static func sequence(_ count: Int, seed: UInt64) -> (tokens: [UInt32], keys: [UInt16], values: [UInt16]) {
        var random = SplitMix64(seed: seed)
        let elements = spec.shape.elements(tokens: count)
        return ((0..<count).map { _ in UInt32.random(in: 0..<128_000, using: &random) },
                (0..<elements).map { _ in UInt16.random(in: 0...0x7BFF, using: &random) },
                (0..<elements).map { _ in UInt16.random(in: 0...0x7BFF, using: &random) })
    }

    static func same(_ got: CachedKV, _ expected: (tokens: [UInt32], keys: [UInt16], values: [UInt16]), _ tokens: Int) -> Bool {
        got.tokens == tokens && got.keys == expected.keys && got.values == expected.values
    }

    /// Waits until `client`'s daemon reports `counter` at least `value` (the write-behind
    /// queue works off the request path); the last value seen.
    static func awaitCounter(_ client: KVTierClient, _ counter: String, atLeast value: UInt64) async throws -> UInt64 {
        let deadline = Date().addingTimeInterval(EventWaits.stuckSeconds)
        var seen: UInt64 = 0
        while Date() < deadline {
            seen = try await client.status()[counter] ?? 0
            if seen >= value { return seen }
            try await Task.sleep(for: .milliseconds(20))
        }
        return seen
    }

    @Test func pagesOneDaemonEvictsAreHitsOnTheOtherAndRedisDeathCostsOnlyMisses() async throws {
        // Its start waits for READY=1: on a thread of its own, not the cooperative pool.
        let redis = try await EventWaits.onThread { Result { () throws(ProcessFailure) in try RedisServer() } }.get()
        let key = (0..<32).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
        let folderA = try TemporaryFolder("kvtier-remote-a"), folderB = try TemporaryFolder("kvtier-remote-b")
        defer { folderA.remove(); folderB.remove() }
        let a = try await startDaemon(in: folderA, ["--config", try Self.configure(folderA, redis: redis, key: key)])
        let b = try await startDaemon(in: folderB, ["--config", try Self.configure(folderB, redis: redis, key: key)])
        let clientA = try await KVTierClient.connect(socketPath: folderA.path + "/s.sock")
        let clientB = try await KVTierClient.connect(socketPath: folderB.path + "/s.sock")
        let modelA = try await clientA.registerModel(Self.spec), modelB = try await clientB.registerModel(Self.spec)
        #expect(modelA.modelID == modelB.modelID)

        // A stores 4 pages and evicts them: to its disk, and behind that to Redis.
        let shared = Self.sequence(64, seed: 1)
        #expect(try await clientA.put(modelA, tokens: shared.tokens, keys: shared.keys, values: shared.values) == 64)
        #expect(try await clientA.evictAll().evicted == 4)
        #expect(try await Self.awaitCounter(clientA, "remote_writes", atLeast: 4) == 4)

        // B never saw them: its LOOKUP finds them remote (counted with disk on the wire), its GET
        // serves them bit for bit.
        let lookup = try await clientB.lookup(modelB, tokens: shared.tokens)
        #expect(lookup.cachedTokens == 64 && lookup.ramTokens == 0 && lookup.diskTokens == 64)
        let got = try await clientB.get(modelB, tokens: shared.tokens)
        #expect(Self.same(got, shared, 64))
        let statusB = try await clientB.status()
        #expect(statusB["remote_promotions"] == 4)
        #expect(statusB["lookup_hits_remote"] == 1)
        #expect(statusB["remote_up"] == 1)
        let shown = try runToCompletion([Checkout.cli!, "status", "--socket", folderB.path + "/s.sock"])
        #expect(shown.code == 0)
        #expect(shown.output.contains("remote") && shown.output.contains("up, queue"), "\(shown.output)")

        // Redis dies. Both daemons keep serving what they hold, and a request that would have
        // asked Redis costs a miss, not a hang.
        let local = Self.sequence(48, seed: 2)
        #expect(try await clientB.put(modelB, tokens: local.tokens, keys: local.keys, values: local.values) == 48)
        redis.kill()
        let started = Date()
        let unknown = Self.sequence(64, seed: 3)
        #expect(try await clientA.lookup(modelA, tokens: unknown.tokens).cachedTokens == 0)
        #expect(try await clientB.get(modelB, tokens: unknown.tokens).tokens == 0)
        #expect(Self.same(try await clientA.get(modelA, tokens: shared.tokens), shared, 64))
        #expect(Self.same(try await clientB.get(modelB, tokens: shared.tokens), shared, 64))
        #expect(Self.same(try await clientB.get(modelB, tokens: local.tokens), local, 48))
        // Eviction (and its remote copies, now dropped) goes on.
        #expect(try await clientB.evictAll().evicted >= 3)
        #expect(Self.same(try await clientB.get(modelB, tokens: local.tokens), local, 48))
        let elapsed = Date().timeIntervalSince(started)
        #expect(elapsed < 10, "requests with Redis dead took \(elapsed) s")
        #expect(try await clientA.status()["remote_up"] == 0)
        let down = try runToCompletion([Checkout.cli!, "status", "--socket", folderA.path + "/s.sock"])
        #expect(down.output.contains("DOWN"), "\(down.output)")

        await clientA.close()
        await clientB.close()
        #expect(a.poll() == nil && b.poll() == nil, "both daemons still running")
        #expect(exitCode(a.stop()) == 0)
        #expect(exitCode(b.stop()) == 0)
        #expect(!a.log.contains("Fatal") && !b.log.contains("Fatal"))
    }

    @Test func badRemoteSettingsStopTheDaemonWithTheFix() throws {
        guard let daemon = Checkout.daemon else { throw TestFailure("\(Checkout.missingBinaries)") }
        let folder = try TemporaryFolder("kvtier-remote-config")
        defer { folder.remove() }
        func run(_ json: String) throws -> (code: Int32, output: String) {
            let config = try folder.write("c.json", json)
            var environment = ProcessInfo.processInfo.environment
            environment.removeValue(forKey: "KVTIER_REMOTE_KEY")
            return try runToCompletion([daemon, "--config", config, "--state-dir", folder.path + "/state", "--socket", folder.path + "/s.sock"],
                                       environment: environment)
        }
        let noKey = try run(#"{"remoteURL": "redis://127.0.0.1:6390"}"#)
        #expect(noKey.code != 0)
        #expect(noKey.output.contains("remoteKeyFile"), "\(noKey.output)")
        let tls = try run(#"{"remoteURL": "rediss://cache:6380"}"#)
        #expect(tls.code != 0 && tls.output.contains("TLS"), "\(tls.output)")
        let pages = try run(#"{"remoteURL": "redis://cache", "remotePages": "some"}"#)
        #expect(pages.code != 0 && pages.output.contains("evicted, durable, all"), "\(pages.output)")
        let printed = try runToCompletion([daemon, "--config", try folder.write("p.json", #"{"remoteURL": "redis://u@cache:7000/2", "remoteBudget": "1GiB"}"#),
                                           "--print-config"])
        #expect(printed.code == 0)
        #expect(printed.output.contains(#""remoteURL": "redis://u@cache:7000/2""#) && printed.output.contains(#""remoteBudget": "1GiB""#), "\(printed.output)")
    }
}
