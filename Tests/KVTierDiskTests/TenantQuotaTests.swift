import KVTierCodec
import KVTierCore
import KVTierIO
import KVTierStore
import KVTierStoreTesting
import KVTierTools
import Testing

/// Finding 4(c) (docs/security.md): leased pages count against their tenant. Before the
/// fix one never-released GET of 128 MiB held 128 MiB against a 16 MiB RAM budget, and the
/// eviction it caused pushed every other tenant's pages out of RAM.
@Suite struct TenantQuotaTests {
    typealias Store = TieredStoreTests
    /// 32 KiB per token, 512 KiB per 16-token page.
    static let model = ModelSpec(id: 0x78, name: "wide", layers: 8, kvHeads: 8, headDim: 128, elementType: .float16, pageTokens: 16)
    static let budget = 16 << 20

    static func store(disk: DiskTier) throws -> TieredStore {
        var configuration = TieredStore.Configuration()
        configuration.ramBudgetBytes = budget
        configuration.tenantRAMQuotaBytes = budget
        configuration.arenaBytes = TieredStore.pageArenaBytes(quota: budget, ceiling: 64 << 30)
        configuration.diskCodec = Codec(.fp16, .none)
        configuration.minResidenceMicros = 0
        let arenaBytes = configuration.arenaBytes
        let store = TieredStore(configuration: configuration, disk: disk, logger: Store.logger) { tenant in
            try ArenaPageMemory(name: "kvtier-quota-test-\(tenant)", capacity: arenaBytes, stagingCapacity: 1 << 20, logger: Store.logger)
        }
        try store.register(model)
        return store
    }

    static func chunks(_ range: Range<Int>) -> [TieredStore.PutChunk] {
        stride(from: range.lowerBound, to: range.upperBound, by: model.pageTokens).map { start in
            .bytes(TestPattern.finiteFloat16(bytes: model.pageTokens * model.bytesPerToken, seed: UInt64(start)))
        }
    }

    @Test func aHugeUnreleasedGetPushesNoOtherTenantOut() async throws {
        let disk = try DiskTier(storage: SimulatedStorage(seed: 4), logger: Store.logger)
        let store = try Self.store(disk: disk)
        let pageBytes = Self.model.pageTokens * Self.model.bytesPerToken
        // Bob: 4 MiB of pages, well within his share.
        let bobTokens = (0..<128).map { UInt32($0 + 7) }
        _ = try await store.put(Store.bob, owner: 1, modelID: Self.model.id, tokens: bobTokens, dataStart: 0,
                                chunks: Self.chunks(0..<128), durable: false)
        // Alice: 128 MiB of pages, put 8 MiB at a time; past her quota her own pages go to disk.
        let aliceTokens = (0..<4096).map { UInt32($0 * 3 + 1) }
        for start in stride(from: 0, to: 4096, by: 256) {
            _ = try await store.put(Store.alice, owner: 2, modelID: Self.model.id, tokens: Array(aliceTokens[0..<start + 256]),
                                    dataStart: start, chunks: Self.chunks(start..<start + 256), durable: false)
        }
        // Eviction runs behind the put: wait for it to settle.
        await store.evictionSettled()
        let bobBefore = try store.lookup(Store.bob, modelID: Self.model.id, tokens: bobTokens)
        #expect(bobBefore.ramTokens == 128, "alice's puts evict her own pages, not bob's: \(bobBefore)")

        // Alice GETs all 128 MiB and never releases the lease.
        let got = try await store.get(Store.alice, owner: 2, modelID: Self.model.id, tokens: aliceTokens, maxTokens: 0)
        await store.makeRoom()
        let status = Dictionary(uniqueKeysWithValues: store.status().map { ($0.name, $0.value) })
        print("TenantQuotaTests: GET of \(aliceTokens.count) tokens served \(got.tokens) (\(got.pages.count) pages of \(pageBytes) bytes); ram_bytes \(status["ram_bytes"] ?? 0)")
        #expect(got.tokens > 0 && got.pages.count * pageBytes <= Self.budget, "the GET serves what fits alice's quota")
        let memory = try store.memory(for: Store.alice)
        for (index, page) in got.pages.enumerated() {
            let expected = TestPattern.finiteFloat16(bytes: pageBytes, seed: UInt64(index * 16)).copyBytes()
            #expect(Array(memory.buffer(page.extent).readOnly[0..<pageBytes]) == expected, "page \(index) is alice's bytes")
        }
        let bobAfter = try store.lookup(Store.bob, modelID: Self.model.id, tokens: bobTokens)
        #expect(bobAfter.ramTokens == 128, "bob's pages stay in RAM: \(bobAfter)")
        #expect(status["ram_bytes"]! <= UInt64(Self.budget + 4 * (1 << 20) + pageBytes), "RAM stays within budget plus alice's leased share")
        try store.release(Store.alice, leaseID: got.leaseID)
    }

    /// A tenant past its quota evicts its own pages even when RAM as a whole has room.
    @Test func aTenantOverItsQuotaEvictsItsOwnPages() async throws {
        let disk = try DiskTier(storage: SimulatedStorage(seed: 5), logger: Store.logger)
        let pageBytes = 16 * Store.model.bytesPerToken  // 8 KiB
        var configuration = TieredStore.Configuration()
        configuration.ramBudgetBytes = 64 * pageBytes
        configuration.tenantRAMQuotaBytes = 8 * pageBytes
        configuration.diskCodec = Codec(.fp16, .none)
        configuration.minResidenceMicros = 0
        let store = TieredStore(configuration: configuration, disk: disk, logger: Store.logger) { tenant in
            try ArenaPageMemory(name: "kvtier-quota-own-\(tenant)", capacity: 16 << 20, stagingCapacity: 1 << 20, logger: Store.logger)
        }
        try store.register(Store.model)
        let bobTokens = Array(Store.tokens[0..<64])
        _ = try await store.put(Store.bob, owner: 1, modelID: Store.model.id, tokens: bobTokens, dataStart: 0,
                                chunks: Store.chunks(from: 0, to: 64), durable: false)
        let aliceTokens = (0..<320).map { UInt32($0 + 5_000) }
        _ = try await store.put(Store.alice, owner: 2, modelID: Store.model.id, tokens: aliceTokens, dataStart: 0,
                                chunks: Store.chunks(from: 0, to: 320), durable: false)
        // Eviction runs behind the put: wait for it to settle.
        await store.evictionSettled()
        let alice = try store.lookup(Store.alice, modelID: Store.model.id, tokens: aliceTokens)
        #expect(alice.cachedTokens == 320 && alice.ramTokens <= 8 * 16, "alice keeps at most her quota in RAM: \(alice)")
        let bob = try store.lookup(Store.bob, modelID: Store.model.id, tokens: bobTokens)
        #expect(bob.ramTokens == 64, "bob keeps his pages: \(bob)")
        // Her GET of everything serves what fits her quota, from disk, exact.
        let got = try await store.get(Store.alice, owner: 2, modelID: Store.model.id, tokens: aliceTokens, maxTokens: 0)
        #expect(got.tokens == 8 * 16 && got.pages.count == 8)
        let memory = try store.memory(for: Store.alice)
        for (index, page) in got.pages.enumerated() {
            #expect(memory.buffer(page.extent).copyBytes().prefix(pageBytes) == Store.rows(index * 16, 16).copyBytes()[...], "page \(index)")
        }
        try store.release(Store.alice, leaseID: got.leaseID)
    }
}
