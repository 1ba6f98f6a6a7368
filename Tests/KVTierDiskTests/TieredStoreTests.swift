import KVTierCodec
import KVTierCore
import KVTierIO
import KVTierStore
import KVTierStoreTesting
import KVTierTools
import Logging
import Testing

/// The RAM tier over real shared memory (memfd arenas) and a disk tier on simulated storage.
@Suite struct TieredStoreTests {
    static let model = ModelSpec(id: 0x77, name: "tiny", layers: 2, kvHeads: 2, headDim: 32, elementType: .float16, pageTokens: 16)
    static let alice = TenantID(1000)
    static let bob = TenantID(1001)

    static var logger: Logger {
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        return logger
    }

    static func store(ramBudget: Int = 64 << 20, disk: DiskTier? = nil) throws -> TieredStore {
        var configuration = TieredStore.Configuration()
        configuration.ramBudgetBytes = ramBudget
        configuration.minResidenceMicros = 0
        return try store(configuration: configuration, disk: disk)
    }

    /// A store with this configuration (its arena size and disk codec set as above).
    static func store(configuration base: TieredStore.Configuration, disk: DiskTier? = nil) throws -> TieredStore {
        var configuration = base
        configuration.arenaBytes = 256 << 20
        configuration.diskCodec = Codec(.fp16, .lz4)
        let store = TieredStore(configuration: configuration, disk: disk, logger: logger) { tenant in
            try ArenaPageMemory(name: "kvtier-test-\(tenant)", capacity: 256 << 20, stagingCapacity: 64 << 20, logger: logger)
        }
        try store.register(model)
        return store
    }

    /// KV of `count` tokens starting at `start` in page layout: row values derive from the
    /// token position, so any slice can be checked.
    static func rows(_ start: Int, _ count: Int) -> PageBuffer {
        TestPattern.finiteFloat16(bytes: count * model.bytesPerToken, seed: UInt64(start) << 20 | UInt64(count))
    }

    /// Splits [dataStart, tokens) into page chunks as docs/protocol.md says, inline, their
    /// bytes made by `rows(start, count)`.
    static func chunks(from dataStart: Int, to end: Int, rows: (Int, Int) -> PageBuffer = rows) -> [TieredStore.PutChunk] {
        var chunks: [TieredStore.PutChunk] = []
        var at = dataStart
        while at < end {
            let pageEnd = min((at / model.pageTokens + 1) * model.pageTokens, end)
            chunks.append(.bytes(rows(at, pageEnd - at)))
            at = pageEnd
        }
        return chunks
    }

    static let tokens: [UInt32] = (0..<200).map { UInt32($0 * 7 % 256) }

    @Test func putLookupGetAndDeduplicate() async throws {
        let store = try Self.store()
        let sequence = Array(Self.tokens[0..<40])
        let put = try await store.put(Self.alice, owner: 1, modelID: Self.model.id, tokens: sequence, dataStart: 0,
                                      chunks: Self.chunks(from: 0, to: 40), durable: false)
        #expect(put.cachedTokens == 40 && put.newPages == 3)
        #expect(try store.lookup(Self.alice, modelID: Self.model.id, tokens: sequence).cachedTokens == 40)
        #expect(try store.lookup(Self.alice, modelID: Self.model.id, tokens: Array(Self.tokens[0..<100])).cachedTokens == 40)
        #expect(try store.lookup(Self.alice, modelID: Self.model.id, tokens: Array(Self.tokens[0..<20])).cachedTokens == 16,
                "a shorter query matches whole pages only")
        // The same prefix from another process is stored once.
        let again = try await store.put(Self.alice, owner: 2, modelID: Self.model.id, tokens: sequence, dataStart: 0,
                                        chunks: Self.chunks(from: 0, to: 40), durable: false)
        #expect(again.newPages == 0)
        let got = try await store.get(Self.alice, owner: 1, modelID: Self.model.id, tokens: sequence, maxTokens: 0)
        #expect(got.tokens == 40 && got.pages.map(\.tokens) == [16, 16, 8])
        let memory = try store.memory(for: Self.alice)
        for (i, page) in got.pages.enumerated() {
            let expected = Self.rows(i * 16, page.tokens).copyBytes()
            #expect(Array(memory.buffer(page.extent).readOnly[0..<expected.count]) == expected, "page \(i)")
        }
        try store.release(Self.alice, leaseID: got.leaseID)
    }

    @Test func anExtendingPutCompletesThePartialPageWithoutDuplicates() async throws {
        let store = try Self.store()
        _ = try await store.put(Self.alice, owner: 1, modelID: Self.model.id, tokens: Array(Self.tokens[0..<20]), dataStart: 0,
                                chunks: Self.chunks(from: 0, to: 20), durable: false)
        let extended = Array(Self.tokens[0..<30])
        #expect(try store.lookup(Self.alice, modelID: Self.model.id, tokens: extended).cachedTokens == 20)
        let put = try await store.put(Self.alice, owner: 1, modelID: Self.model.id, tokens: extended, dataStart: 20,
                                      chunks: Self.chunks(from: 20, to: 30), durable: false)
        #expect(put.cachedTokens == 30 && put.newPages == 1)
        let pages = store.status().first { $0.name == "ram_pages" }?.value
        #expect(pages == 2, "the 4-token partial page must be replaced by the 14-token one, not kept beside it")
        let got = try await store.get(Self.alice, owner: 1, modelID: Self.model.id, tokens: extended, maxTokens: 0)
        let memory = try store.memory(for: Self.alice)
        let page = memory.buffer(got.pages[1].extent)
        let row = Self.model.kvHeads * Self.model.headDim * 2
        let old = Self.rows(16, 4), new = Self.rows(20, 10)
        // Layer 0 keys: 4 old rows then 10 new rows.
        #expect(Array(page.readOnly[0..<4 * row]) == Array(old.readOnly[0..<4 * row]))
        #expect(Array(page.readOnly[4 * row..<14 * row]) == Array(new.readOnly[0..<10 * row]))
    }

    @Test func tenantsSeeNothingOfEachOther() async throws {
        let store = try Self.store()
        let sequence = Array(Self.tokens[0..<32])
        _ = try await store.put(Self.alice, owner: 1, modelID: Self.model.id, tokens: sequence, dataStart: 0,
                                chunks: Self.chunks(from: 0, to: 32), durable: false)
        #expect(try store.lookup(Self.bob, modelID: Self.model.id, tokens: sequence).cachedTokens == 0)
        let got = try await store.get(Self.bob, owner: 9, modelID: Self.model.id, tokens: sequence, maxTokens: 0)
        #expect(got.tokens == 0 && got.pages.isEmpty)
        let lease = try await store.get(Self.alice, owner: 1, modelID: Self.model.id, tokens: sequence, maxTokens: 0).leaseID
        #expect(throws: StoreError.self) { try store.release(Self.bob, leaseID: lease) }
    }

    @Test func stagingExtentsAreAdoptedAndForeignOnesRefused() async throws {
        let store = try Self.store()
        let bytes = 16 * Self.model.bytesPerToken
        let (_, extents) = try store.allocate(Self.alice, owner: 5, sizes: [bytes])
        let memory = try store.memory(for: Self.alice)
        memory.buffer(extents[0]).bytes.copyMemory(from: Self.rows(0, 16).readOnly)
        let sequence = Array(Self.tokens[0..<16])
        await #expect(throws: StoreError.self) {
            _ = try await store.put(Self.alice, owner: 6, modelID: Self.model.id, tokens: sequence, dataStart: 0,
                                    chunks: [.extent(extents[0])], durable: false)
        }
        let put = try await store.put(Self.alice, owner: 5, modelID: Self.model.id, tokens: sequence, dataStart: 0,
                                      chunks: [.extent(extents[0])], durable: false)
        #expect(put.newPages == 1)
        let got = try await store.get(Self.alice, owner: 5, modelID: Self.model.id, tokens: sequence, maxTokens: 0)
        #expect(got.pages.first?.extent == extents[0], "a whole staged page is adopted, not copied")
    }

    @Test func pagesOverBudgetMoveToDiskAndComeBackExact() async throws {
        let disk = try DiskTier(storage: SimulatedStorage(seed: 1), logger: Self.logger)
        let pageBytes = 16 * Self.model.bytesPerToken  // 8 KiB
        let store = try Self.store(ramBudget: 4 * pageBytes, disk: disk)
        let sequence = Array(Self.tokens[0..<160])  // 10 pages
        _ = try await store.put(Self.alice, owner: 1, modelID: Self.model.id, tokens: sequence, dataStart: 0,
                                chunks: Self.chunks(from: 0, to: 160), durable: false)
        // Eviction runs behind the put: wait for it to settle.
        await store.evictionSettled()
        let status = Dictionary(uniqueKeysWithValues: store.status().map { ($0.name, $0.value) })
        #expect(status["ram_bytes"]! <= UInt64(4 * pageBytes))
        #expect(status["evictions"]! >= 6 && status["disk_pages"]! >= 6)
        let lookup = try store.lookup(Self.alice, modelID: Self.model.id, tokens: sequence)
        #expect(lookup.cachedTokens == 160 && lookup.diskTokens >= 96)
        let got = try await store.get(Self.alice, owner: 1, modelID: Self.model.id, tokens: sequence, maxTokens: 0)
        #expect(got.tokens == 160)
        let memory = try store.memory(for: Self.alice)
        for (i, page) in got.pages.enumerated() {
            #expect(memory.buffer(page.extent).copyBytes().prefix(pageBytes) == Self.rows(i * 16, 16).copyBytes()[...], "page \(i)")
        }
    }

    @Test func durablePagesSurviveARestart() async throws {
        let storage = SimulatedStorage(seed: 2)
        let sequence = Array(Self.tokens[0..<40])
        do {
            let disk = try DiskTier(storage: storage, logger: Self.logger)
            let store = try Self.store(disk: disk)
            _ = try await store.put(Self.alice, owner: 1, modelID: Self.model.id, tokens: sequence, dataStart: 0,
                                    chunks: Self.chunks(from: 0, to: 40), durable: true)
            await disk.close()
        }
        let disk = try DiskTier(storage: storage, logger: Self.logger)
        let store = try Self.store(disk: disk)
        let lookup = try store.lookup(Self.alice, modelID: Self.model.id, tokens: sequence)
        #expect(lookup.cachedTokens == 40 && lookup.diskTokens == 40, "\(lookup)")
        let got = try await store.get(Self.alice, owner: 1, modelID: Self.model.id, tokens: sequence, maxTokens: 0)
        let memory = try store.memory(for: Self.alice)
        #expect(memory.buffer(got.pages[2].extent).copyBytes().prefix(8 * Self.model.bytesPerToken) == Self.rows(32, 8).copyBytes()[...])
    }

    @Test func malformedPutsAreRefusedWithReasons() async throws {
        let store = try Self.store()
        let sequence = Array(Self.tokens[0..<40])
        await #expect(throws: StoreError.self) {  // data must start within the cached prefix
            _ = try await store.put(Self.alice, owner: 1, modelID: Self.model.id, tokens: sequence, dataStart: 16,
                                    chunks: Self.chunks(from: 16, to: 40), durable: false)
        }
        await #expect(throws: StoreError.self) {  // wrong chunk count
            _ = try await store.put(Self.alice, owner: 1, modelID: Self.model.id, tokens: sequence, dataStart: 0,
                                    chunks: Array(Self.chunks(from: 0, to: 40).dropLast()), durable: false)
        }
        await #expect(throws: StoreError.unknownModel(0xBAD)) {
            _ = try await store.put(Self.alice, owner: 1, modelID: 0xBAD, tokens: sequence, dataStart: 0,
                                    chunks: Self.chunks(from: 0, to: 40), durable: false)
        }
        #expect(try store.lookup(Self.alice, modelID: Self.model.id, tokens: sequence).cachedTokens == 0, "a refused put stores nothing")
    }
}
