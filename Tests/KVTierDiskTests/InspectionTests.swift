import KVTierCore
import KVTierStore
import KVTierStoreTesting
import KVTierTools
import Testing

/// What `kvtier pages` and `kvtier evict` see and do, at the store.
@Suite struct InspectionTests {
    typealias S = SessionStoreTests

    @Test func pagesListTiersHoldsAndCodecs() async throws {
        let (store, disk) = try S.open(SimulatedStorage(seed: 31))
        let tokens = Array(TieredStoreTests.tokens[0..<40])
        try await S.put(store, tokens, from: 0, session: "chat")
        try await S.put(store, Array(TieredStoreTests.tokens[100..<116]), from: 0, session: nil)
        let pages = store.pageSummaries(S.alice, modelID: nil)
        #expect(pages.count == 4)
        let held = pages.filter { $0.hold == .session }
        #expect(held.count == 3 && held.allSatisfy { $0.inRAM && $0.onDisk && $0.diskCodec != nil && $0.storedBytes > 0 })
        #expect(held.map(\.tokens).sorted() == [8, 16, 16])
        #expect(pages.filter { $0.hold == .none }.map { ($0.inRAM, $0.onDisk) }.elementsEqual([(true, false)], by: ==))
        #expect(store.pageSummaries(S.bob, modelID: nil).isEmpty, "tenants see only their own pages")
        #expect(store.pageSummaries(S.alice, modelID: 0x999).isEmpty)
        await disk.close()
    }

    @Test func evictMovesPagesOutAndSkipsLeasedAndPinned() async throws {
        let (store, disk) = try S.open(SimulatedStorage(seed: 32))
        let tokens = Array(TieredStoreTests.tokens[0..<40])
        try await S.put(store, tokens, from: 0, session: nil)
        var result = try await store.evict(S.alice, modelID: S.model.id, tokens: tokens, deleteFromDisk: false)
        #expect(result.evicted == 3 && result.deleted == 0 && result.skipped == 0, "\(result)")
        var lookup = try store.lookup(S.alice, modelID: S.model.id, tokens: tokens)
        #expect(lookup.ramTokens == 0 && lookup.diskTokens == 40)
        #expect(try await S.servesExactly(store, tokens), "evicted pages come back exact")

        // A leased page stays whole (RAM and disk); the rest goes, and with deleteFromDisk leaves the disk too.
        let lease = try await store.get(S.alice, owner: 3, modelID: S.model.id, tokens: Array(tokens[0..<16]), maxTokens: 0)
        result = try await store.evict(S.alice, modelID: nil, tokens: nil, deleteFromDisk: true)
        #expect(result.evicted == 2 && result.skipped == 1 && result.deleted == 2, "\(result)")
        try store.release(S.alice, leaseID: lease.leaseID)
        lookup = try store.lookup(S.alice, modelID: S.model.id, tokens: tokens)
        #expect(lookup.cachedTokens == 16 && lookup.ramTokens == 16, "\(lookup)")

        // A pinned session's pages are not evicted.
        try await S.put(store, Array(TieredStoreTests.tokens[50..<82]), from: 0, session: "keep")
        _ = try store.setSessionPinned(S.alice, name: "keep", pinned: true)
        result = try await store.evict(S.alice, modelID: nil, tokens: nil, deleteFromDisk: false)
        #expect(result.skipped == 2, "\(result)")
        #expect(try store.sessionDetail(S.alice, name: "keep").ramTokens == 32)

        // Evicting a session's pages is not a use of it (no TTL restart, no prefetch).
        _ = try store.setSessionPinned(S.alice, name: "keep", pinned: false)
        let before = try store.sessionDetail(S.alice, name: "keep").session.lastUsedMicros
        try await Task.sleep(for: .milliseconds(5))
        result = try await store.evictSession(S.alice, name: "keep", deleteFromDisk: false)
        let after = try store.sessionDetail(S.alice, name: "keep")
        #expect(result.evicted == 2 && after.ramTokens == 0 && after.diskTokens == 32, "\(result) \(after)")
        #expect(after.session.lastUsedMicros == before)
        await #expect(throws: StoreError.self) { try await store.evictSession(S.bob, name: "keep", deleteFromDisk: false) }
        await disk.close()
    }
}
