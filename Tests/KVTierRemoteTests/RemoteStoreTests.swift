import KVTierCodec
import KVTierCore
import KVTierRemote
import KVTierStore
import KVTierSystem
import KVTierTestProcess
import Testing

/// Two stores (two hosts' daemons, each its own disk tier and memory) sharing one real Redis.
@Suite(.disabled(if: redisMissing, "neither redis-server nor valkey-server is on PATH (scripts/install-deps installs redis-server)"))
struct RemoteStoreTests {
    let key = DigestKey.random()

    struct Host {
        let tier: RedisRemoteTier
        let store: TieredStore
    }

    func host(_ server: RedisServer, _ pages: RemotePages, seed: UInt64, diskBudget: Int? = nil, key: DigestKey? = nil,
              timeoutMillis: Int = 250, minRetryMillis: Int = RedisRemoteTier.minRetryMillis) throws -> Host {
        let tier = try makeTier(server, key: key ?? self.key) {
            $0.timeoutMillis = timeoutMillis
            $0.minRetryMillis = minRetryMillis
        }
        let store = try makeStore(remote: RemoteAttachment(tier: tier, key: key ?? self.key, pages: pages), diskBudget: diskBudget, seed: seed)
        return Host(tier: tier, store: store)
    }

    @Test func pagesOneHostEvictsAreBitExactHitsOnTheOther() async throws {
        let server = try await startRedis()
        let a = try host(server, .all, seed: 1), b = try host(server, .all, seed: 2)
        defer { a.tier.shutdown(drainMillis: 0); b.tier.shutdown(drainMillis: 0) }
        let sequence = TestSequence(pages: 6, seed: 11)
        _ = try await a.store.put(alice, owner: 1, modelID: testModel.id, tokens: sequence.tokens, dataStart: 0, chunks: sequence.chunks, durable: false)
        let evicted = try await a.store.evict(alice, modelID: nil, tokens: nil, deleteFromDisk: false)
        #expect(evicted.evicted == 6)
        #expect(await a.tier.drainedOffPool(timeoutMillis: 10_000))
        #expect(counter(a.tier.status(), "remote_writes") == 6)

        let lookup = try await b.store.lookupOffPool(alice, sequence.tokens)
        #expect(lookup.cachedTokens == sequence.tokens.count)
        #expect(lookup.remoteTokens == sequence.tokens.count)
        let got = try await fetchAll(b.store, alice, sequence.tokens)
        #expect(got.tokens == sequence.tokens.count)
        #expect(got.bytes == sequence.bytes, "remote pages are served bit for bit")
        let status = b.store.status()
        #expect(counter(status, "remote_promotions") == 6)
        #expect(counter(status, "lookup_hits_remote") == 1)
        // Promoted pages are B's RAM pages now: a second GET asks Redis nothing.
        let fetches = counter(b.tier.status(), "remote_fetches")
        #expect(try await fetchAll(b.store, alice, sequence.tokens).bytes == sequence.bytes)
        #expect(counter(b.tier.status(), "remote_fetches") == fetches)
        // Another tenant of B sees none of alice's pages.
        #expect(try await b.store.lookupOffPool(bob, sequence.tokens).cachedTokens == 0)
        #expect(try await fetchAll(b.store, bob, sequence.tokens).tokens == 0)
        // Written back to B's disk on eviction, a promoted page is not sent to Redis again.
        let writes = counter(b.tier.status(), "remote_writes")
        _ = try await b.store.evict(alice, modelID: nil, tokens: nil, deleteFromDisk: false)
        #expect(await b.tier.drainedOffPool(timeoutMillis: 10_000))
        #expect(counter(b.tier.status(), "remote_writes") == writes)
    }

    @Test func aPrefixRunsAcrossLocalAndRemotePages() async throws {
        let server = try await startRedis()
        let a = try host(server, .all, seed: 3), b = try host(server, .all, seed: 4)
        defer { a.tier.shutdown(drainMillis: 0); b.tier.shutdown(drainMillis: 0) }
        let sequence = TestSequence(pages: 5, seed: 12)
        let size = testModel.pageTokens
        // B holds pages 0-1 itself, A evicts 0-4 to Redis: B's prefix is local, then remote.
        _ = try await b.store.put(alice, owner: 1, modelID: testModel.id, tokens: Array(sequence.tokens[0..<2 * size]), dataStart: 0,
                                  chunks: Array(sequence.chunks[0..<2]), durable: false)
        _ = try await a.store.put(alice, owner: 1, modelID: testModel.id, tokens: sequence.tokens, dataStart: 0, chunks: sequence.chunks, durable: false)
        _ = try await a.store.evict(alice, modelID: nil, tokens: nil, deleteFromDisk: false)
        #expect(await a.tier.drainedOffPool(timeoutMillis: 10_000))
        let lookup = try await b.store.lookupOffPool(alice, sequence.tokens)
        #expect(lookup.ramTokens == 2 * size && lookup.remoteTokens == 3 * size)
        let got = try await fetchAll(b.store, alice, sequence.tokens)
        #expect(got.tokens == 5 * size && got.bytes == sequence.bytes)
        #expect(counter(b.store.status(), "remote_promotions") == 3)
        // A GET capped by maxTokens asks for no page past it.
        let capped = try await b.store.get(alice, owner: 2, modelID: testModel.id, tokens: sequence.tokens + [1, 2, 3], maxTokens: 3 * size)
        #expect(capped.tokens == 3 * size)
        try b.store.release(alice, leaseID: capped.leaseID)
    }

    @Test func evictedModeSendsWhatTheDiskBudgetDeletes() async throws {
        let server = try await startRedis()
        let recordBytes = Block.roundUp(try pageRecord(address(alice, 0), seed: 0).record.count)
        let a = try host(server, .evicted, seed: 5, diskBudget: 6 * recordBytes)
        let b = try host(server, .evicted, seed: 6)
        defer { a.tier.shutdown(drainMillis: 0); b.tier.shutdown(drainMillis: 0) }
        let sequence = TestSequence(pages: 12, seed: 13)
        let size = testModel.pageTokens
        // A conversation growing three pages per turn, each turn a durable put: the budget
        // deletes the oldest pages as the later turns arrive.
        for turn in 0..<4 {
            _ = try await a.store.put(alice, owner: 1, modelID: testModel.id, tokens: Array(sequence.tokens[0..<(turn + 1) * 3 * size]),
                                      dataStart: turn * 3 * size, chunks: Array(sequence.chunks[turn * 3..<(turn + 1) * 3]), durable: true)
        }
        #expect(await a.tier.drainedOffPool(timeoutMillis: 10_000))
        // What left A's disk is in Redis, and only that: durable pages are not copied in this mode.
        let addresses = (0..<12).map { i in
            PageAddress(tenant: alice, key: PageKeyChain.keys(modelID: testModel.id, tokens: Array(sequence.tokens[0..<(i + 1) * size]),
                                                              pageTokens: size, wholePagesOnly: true, limit: .max)[i])
        }
        let inRedis = await b.tier.containsOffPool(addresses)
        let remote = Set(addresses.indices.filter { inRedis[$0] }.map { addresses[$0] })
        // Pages off A's disk now are in Redis (a later durable put may have written some of the
        // deleted pages, still in A's RAM, to disk again: those stay in Redis too). The newest
        // turn's pages never left the disk, so they were never sent.
        let deleted = a.store.pageSummaries(alice, modelID: nil).filter { !$0.onDisk }.map(\.address)
        #expect(!deleted.isEmpty)
        #expect(Set(deleted).isSubset(of: remote))
        #expect(remote.isDisjoint(with: addresses[9..<12]))
        #expect(counter(a.tier.status(), "remote_writes") == UInt64(remote.count))
        // The oldest pages went first: the other host restores the sequence's start bit for bit.
        let got = try await fetchAll(b.store, alice, sequence.tokens)
        #expect(got.tokens >= size)
        #expect(got.bytes == Array(sequence.bytes.prefix(got.bytes.count)))
    }

    @Test func durableModeCopiesDurablePutsOnly() async throws {
        let server = try await startRedis()
        let a = try host(server, .durable, seed: 7)
        defer { a.tier.shutdown(drainMillis: 0) }
        let durable = TestSequence(pages: 3, seed: 14), plain = TestSequence(pages: 2, seed: 15)
        _ = try await a.store.put(alice, owner: 1, modelID: testModel.id, tokens: durable.tokens, dataStart: 0, chunks: durable.chunks, durable: true)
        _ = try await a.store.put(alice, owner: 1, modelID: testModel.id, tokens: plain.tokens, dataStart: 0, chunks: plain.chunks, durable: false)
        _ = try await a.store.evict(alice, modelID: nil, tokens: nil, deleteFromDisk: false)
        #expect(await a.tier.drainedOffPool(timeoutMillis: 10_000))
        #expect(counter(a.tier.status(), "remote_writes") == 3)
    }

    @Test func remoteBytesCannotInjectPages() async throws {
        let server = try await startRedis()
        let a = try host(server, .all, seed: 8), b = try host(server, .all, seed: 9)
        defer { a.tier.shutdown(drainMillis: 0); b.tier.shutdown(drainMillis: 0) }
        let sequence = TestSequence(pages: 2, seed: 16)
        _ = try await a.store.put(alice, owner: 1, modelID: testModel.id, tokens: sequence.tokens, dataStart: 0, chunks: sequence.chunks, durable: false)
        _ = try await a.store.evict(alice, modelID: nil, tokens: nil, deleteFromDisk: false)
        #expect(await a.tier.drainedOffPool(timeoutMillis: 10_000))
        let keys = PageKeyChain.keys(modelID: testModel.id, tokens: sequence.tokens, pageTokens: testModel.pageTokens, wholePagesOnly: true, limit: .max)
        func name(_ tenant: TenantID, _ i: Int) -> [UInt8] { Array("kvtier:t\(tenant.rawValue):\(keys[i])".utf8) }
        let redis = try inspect(server)
        var authentic = [UInt8](repeating: 0, count: 1 << 20)
        let length = try authentic.withUnsafeMutableBytes { try redis.get(key: name(alice, 0), into: $0) }
        authentic = Array(authentic[0..<length])

        func plant(_ value: [UInt8], _ tenant: TenantID, _ i: Int) throws {
            try value.withUnsafeBytes { try redis.set(key: name(tenant, i), value: $0) }
        }
        func servedTokens(_ tenant: TenantID) async throws -> Int {
            // A fresh host each time: nothing promoted by an earlier attempt.
            let fresh = try host(server, .all, seed: UInt64.random(in: 100...1_000_000))
            defer { fresh.tier.shutdown(drainMillis: 0) }
            let got = try await fetchAll(fresh.store, tenant, sequence.tokens)
            if got.tokens > 0 { #expect(got.bytes == Array(sequence.bytes.prefix(got.bytes.count))) }
            return got.tokens
        }
        #expect(try await servedTokens(alice) == sequence.tokens.count, "the authentic pages are served")

        // Alice's page copied under bob's key: authentic, but the record names alice.
        try plant(authentic, bob, 0)
        #expect(try await servedTokens(bob) == 0)
        // Page 0 stored at page 1's key.
        try plant(authentic, alice, 1)
        #expect(try await servedTokens(alice) == testModel.pageTokens)
        // One bit changed anywhere: envelope, record header, payload.
        for offset in [9, RemoteRecord.envelopeBytes + 40, authentic.count - 1] {
            var flipped = authentic
            flipped[offset] ^= 0x04
            try plant(flipped, alice, 0)
            #expect(try await servedTokens(alice) == 0, "flipped byte \(offset)")
        }
        // Sealed with another deployment's key.
        let outsider = try pageRecord(PageAddress(tenant: alice, key: keys[0]), seed: 99)
        let forged = try #require(outsider.record.withUnsafeBytes { RemoteRecord.seal($0, key: DigestKey.random()) })
        try plant(forged, alice, 0)
        #expect(try await servedTokens(alice) == 0)
        // Garbage.
        try plant(Array("not a page".utf8), alice, 0)
        #expect(try await servedTokens(alice) == 0)
    }

    @Test func aDeadRedisCostsMissesNeverRequests() async throws {
        let server = try await startRedis()
        let a = try host(server, .all, seed: 10, timeoutMillis: 200, minRetryMillis: 60_000)
        defer { a.tier.shutdown(drainMillis: 0) }
        let local = TestSequence(pages: 3, seed: 17), missing = TestSequence(pages: 3, seed: 18)
        _ = try await a.store.put(alice, owner: 1, modelID: testModel.id, tokens: local.tokens, dataStart: 0, chunks: local.chunks, durable: false)
        server.kill()
        let started = Deadline(millisFromNow: 0).nanoseconds
        #expect(try await a.store.lookupOffPool(alice, missing.tokens).cachedTokens == 0)
        #expect(try await fetchAll(a.store, alice, missing.tokens).tokens == 0)
        #expect(try await fetchAll(a.store, alice, local.tokens).bytes == local.bytes)
        // Evicting to disk still works; the remote copies are dropped.
        #expect(try await a.store.evict(alice, modelID: nil, tokens: nil, deleteFromDisk: false).evicted == 3)
        #expect(await a.tier.drainedOffPool(timeoutMillis: 10_000))
        #expect(try await fetchAll(a.store, alice, local.tokens).bytes == local.bytes)
        let elapsed = Int((Deadline(millisFromNow: 0).nanoseconds - started) / 1_000_000)
        // One request found Redis dead (a miss, within its 200 ms timeout); while the tier was
        // down the others did not try (the back-off outlasts the test). The wall clock is bounded
        // loosely: a loaded machine's cooperative pool, not Redis, sets it.
        #expect(elapsed < 60_000, "requests with Redis dead took \(elapsed) ms")
        let status = a.store.status()
        #expect(counter(status, "remote_failures") == 1)
        #expect(counter(status, "remote_up") == 0)
        #expect((counter(status, "remote_writes_dropped") ?? 0) >= 1)
    }
}
