import KVTierCodec
import KVTierCore
import KVTierIO
import KVTierStore
import KVTierStoreTesting
import KVTierTools
import Testing

/// Defects a review of the session and (since merged) fast-path changes found, each reproduced here before its
/// fix: acknowledged session pages that were only in RAM, a dropped leased page with a stale
/// disk flag, and one staging extent backing two pages.
@Suite struct DurabilityRegressionTests {
    typealias S = SessionStoreTests
    typealias T = TieredStoreTests

    /// A session put over pages another put left in RAM only (a parent page gone, so LOOKUP did
    /// not find them): every page of the session must still reach the disk.
    @Test func aSessionPutWritesPagesItFoundAlreadyInRAM() async throws {
        let (store, disk) = try S.open(SimulatedStorage(seed: 5))
        let tokens = Array(T.tokens[0..<40])
        try await S.put(store, tokens, from: 0, session: nil)
        _ = try await store.evict(S.alice, modelID: S.model.id, tokens: Array(tokens[0..<16]), deleteFromDisk: true)
        try await S.put(store, tokens, from: 0, session: "chat")
        let keys = PageKeyChain.keys(modelID: S.model.id, tokens: tokens, pageTokens: 16)
        #expect(keys.map { disk.contains(PageAddress(tenant: S.alice, key: $0)) } == [true, true, true])
        await disk.close()
    }

    /// A superseded partial page that a client leases keeps both copies; a session on exactly its
    /// tokens then has it on disk.
    @Test func aLeasedSupersededPageKeepsItsDiskCopy() async throws {
        let (store, disk) = try S.open(SimulatedStorage(seed: 6))
        let tokens = Array(T.tokens[0..<40])
        try await store.put(S.alice, owner: 1, modelID: S.model.id, tokens: Array(tokens[0..<20]), dataStart: 0,
                            chunks: S.chunks(from: 0, to: 20), durable: true)
        let partial = PageAddress(tenant: S.alice, key: PageKeyChain.keys(modelID: S.model.id, tokens: Array(tokens[0..<20]), pageTokens: 16)[1])
        let lease = try await store.get(S.alice, owner: 7, modelID: S.model.id, tokens: Array(tokens[0..<20]), maxTokens: 0)
        try await S.put(store, Array(tokens[0..<28]), from: 20, session: nil)
        try await S.put(store, Array(tokens[0..<20]), from: 20, session: "short")
        try store.release(S.alice, leaseID: lease.leaseID)
        #expect(disk.contains(partial))
        #expect(try await S.servesExactly(store, Array(tokens[0..<20])))
        await disk.close()
    }

    /// One PUT naming the same staging extent for two pages is refused, and the extent stays the
    /// connection's.
    @Test func oneExtentForTwoPagesIsRefused() async throws {
        let (store, disk) = try S.open(SimulatedStorage(seed: 7))
        let tokens = Array(T.tokens[0..<32])
        let (_, extents) = try store.allocate(S.alice, owner: 1, sizes: [S.pageBytes])
        let memory = try store.memory(for: S.alice)
        memory.buffer(extents[0]).bytes.copyMemory(from: S.rows(0, 16).readOnly)
        let twice: [TieredStore.PutChunk] = [.extent(extents[0]), .extent(extents[0])]
        await #expect(throws: StoreError.self) {
            try await store.put(S.alice, owner: 1, modelID: S.model.id, tokens: tokens, dataStart: 0, chunks: twice, durable: false)
        }
        #expect(store.pageSummaries(S.alice, modelID: nil).isEmpty)
        // Still a staging extent of the connection: a correct put adopts it.
        let once = try await store.put(S.alice, owner: 1, modelID: S.model.id, tokens: Array(tokens[0..<16]), dataStart: 0,
                                       chunks: [.extent(extents[0])], durable: false)
        #expect(once.newPages == 1)
        await disk.close()
    }
}
