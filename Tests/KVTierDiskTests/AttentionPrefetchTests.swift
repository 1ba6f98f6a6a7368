import KVTierCore
import KVTierIO
import KVTierStore
import KVTierStoreTesting
import Testing

/// Attention-weighted offload, the store's side: a GET of chosen pages (an offloading client's
/// cold pages), prefetch of the disk pages an ATTENTION report puts mass on, and the prefetch
/// accuracy counters (issued, loaded, used before eviction, wasted).
@Suite struct AttentionPrefetchTests {
    typealias S = SessionStoreTests
    typealias T = TieredStoreTests
    static let tokens = Array(T.tokens[0..<160])  // 10 pages of 16

    static func counters(_ store: TieredStore) -> [String: UInt64] {
        Dictionary(uniqueKeysWithValues: store.status().map { ($0.name, $0.value) })
    }

    /// Whether `got` holds pages `indices` of `tokens` with the bytes `S.rows` made.
    static func holds(_ store: TieredStore, _ got: TieredStore.GetResult, pages indices: [Int]) throws -> Bool {
        let memory = try store.memory(for: S.alice)
        guard got.pages.count == indices.count, got.tokens == indices.count * 16 else { return false }
        for (page, index) in zip(got.pages, indices) {
            let expected = S.rows(index * 16, 16).copyBytes()
            guard page.tokens == 16, memory.buffer(page.extent).copyBytes().prefix(expected.count) == expected[...] else { return false }
        }
        return true
    }

    static func getPages(_ store: TieredStore, _ indices: [Int], tokens: [UInt32] = tokens) async throws -> TieredStore.GetResult {
        try await store.beginGetPages(S.alice, owner: 9, modelID: S.model.id, tokens: tokens, pages: indices).value()
    }

    @Test func aGetOfChosenPagesServesThoseFromEitherTier() async throws {
        let (store, disk) = try S.open(SimulatedStorage(seed: 31))
        try await S.put(store, Self.tokens, from: 0, session: nil)
        // From RAM: served at once.
        guard case .done(let fast) = try store.beginGetPages(S.alice, owner: 9, modelID: S.model.id, tokens: Self.tokens, pages: [2, 7]) else {
            Issue.record("a GET of RAM pages should not wait")
            return
        }
        #expect(try Self.holds(store, fast, pages: [2, 7]))
        try store.release(S.alice, leaseID: fast.leaseID)
        // From disk: only the pages asked for come back into RAM.
        _ = try await store.evict(S.alice, modelID: nil, tokens: nil, deleteFromDisk: false)
        let slow = try await Self.getPages(store, [1, 4, 9])
        #expect(try Self.holds(store, slow, pages: [1, 4, 9]))
        try store.release(S.alice, leaseID: slow.leaseID)
        #expect(Self.counters(store)["ram_pages"] == 3 && Self.counters(store)["promotions"] == 3)
        // Tokens past the stored sequence: its pages are found by their keys, the missing one
        // ends the list.
        let longer = Self.tokens + Array(T.tokens[160..<192])
        let partial = try await Self.getPages(store, [3, 10], tokens: longer)
        #expect(try Self.holds(store, partial, pages: [3]))
        try store.release(S.alice, leaseID: partial.leaseID)
        #expect(throws: StoreError.self) { _ = try store.beginGetPages(S.alice, owner: 9, modelID: S.model.id, tokens: Self.tokens, pages: [10]) }
        #expect(throws: StoreError.self) { _ = try store.beginGetPages(S.alice, owner: 9, modelID: S.model.id, tokens: Self.tokens, pages: []) }
        await disk.close()
    }

    @Test func attentionPrefetchesTheMostAttendedDiskPagesAndCountsTheirUse() async throws {
        let (store, disk) = try S.open(SimulatedStorage(seed: 32))  // default: 64 pages a report, mass 0.01 at least
        try await S.put(store, Self.tokens, from: 0, session: nil)
        _ = try await store.evict(S.alice, modelID: nil, tokens: nil, deleteFromDisk: false)
        // Mass on pages 2 (0.1), 5 (0.5), 6 (0.3) and 8 (0.01, under the default least mass).
        var masses = [Float](repeating: 0, count: 10)
        masses[2] = 0.1; masses[5] = 0.5; masses[6] = 0.3; masses[8] = 0.001
        let prefetch = try store.reportAttention(S.alice, modelID: S.model.id, tokens: Self.tokens, masses: masses)
        #expect(await prefetch?.value == 3)
        var c = Self.counters(store)
        #expect(c["prefetch_issued"] == 3 && c["prefetch_loaded"] == 3 && c["prefetch_useful"] == 0 && c["ram_pages"] == 3, "\(c)")
        // Reported again while in RAM: heat only, nothing issued.
        #expect(try store.reportAttention(S.alice, modelID: S.model.id, tokens: Self.tokens, masses: masses) == nil)
        // The client's next step asks for 5 and 6 (prefetched) and 7 (not): 2 used, 1 demand load.
        let got = try await Self.getPages(store, [5, 6, 7])
        #expect(try Self.holds(store, got, pages: [5, 6, 7]))
        try store.release(S.alice, leaseID: got.leaseID)
        c = Self.counters(store)
        #expect(c["prefetch_useful"] == 2 && c["promotions"] == 1, "\(c)")
        // Page 2 leaves RAM without a GET: wasted.
        _ = try await store.evict(S.alice, modelID: nil, tokens: nil, deleteFromDisk: false)
        c = Self.counters(store)
        #expect(c["prefetch_wasted"] == 1 && c["prefetch_useful"] == 2, "\(c)")
        await disk.close()
    }

    @Test func prefetchPerReportIsBounded() async throws {
        let storage = SimulatedStorage(seed: 33)
        let disk = try DiskTier(storage: storage, logger: T.logger)
        var configuration = TieredStore.Configuration()
        configuration.ramBudgetBytes = 64 << 20
        configuration.tenantRAMQuotaBytes = 64 << 20
        configuration.arenaBytes = 256 << 20
        configuration.minResidenceMicros = 0
        configuration.attentionPrefetchPages = 2
        let store = TieredStore(configuration: configuration, disk: disk, logger: T.logger) { tenant in
            try ArenaPageMemory(name: "kvtier-attention-test-\(tenant)", capacity: 256 << 20, stagingCapacity: 64 << 20, logger: T.logger)
        }
        try store.register(S.model)
        try await S.put(store, Self.tokens, from: 0, session: nil)
        _ = try await store.evict(S.alice, modelID: nil, tokens: nil, deleteFromDisk: false)
        var masses = [Float](repeating: 0.02, count: 10)
        masses[9] = 0.4; masses[3] = 0.3; masses[0] = 0.005
        let prefetch = try store.reportAttention(S.alice, modelID: S.model.id, tokens: Self.tokens, masses: masses)
        #expect(await prefetch?.value == 2)
        let inRAM = store.pageSummaries(S.alice, modelID: S.model.id).filter(\.inRAM).count
        #expect(inRAM == 2)
        // The two most attended were read: a GET of them needs no disk read.
        let got = try await Self.getPages(store, [3, 9])
        try store.release(S.alice, leaseID: got.leaseID)
        let c = Self.counters(store)
        #expect(c["prefetch_useful"] == 2 && c["promotions"] == 0, "\(c)")
        await disk.close()
    }
}
