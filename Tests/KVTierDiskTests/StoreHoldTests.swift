import KVTierCore
@testable import KVTierStore
import KVTierStoreTesting
import Testing

/// The store's own holds (a disk write encoding from a page, a merge reading one) keep a page in
/// RAM like a lease, but count against no client's quota: the background evictor writing a
/// tenant's pages must not shrink what that tenant's GET may lease (seen as a GET of 128 pages
/// serving 70 while an eviction group of 58 was being written).
@Suite struct StoreHoldTests {
    typealias Store = TieredStoreTests

    @Test func heldPagesStayInRAMButDoNotCountAgainstTheQuota() async throws {
        let pageBytes = 16 * Store.model.bytesPerToken
        var configuration = TieredStore.Configuration()
        configuration.ramBudgetBytes = 8 * pageBytes
        configuration.tenantRAMQuotaBytes = 4 * pageBytes
        configuration.minResidenceMicros = 0
        // No headroom: the background evictor leaves a tenant at exactly its quota alone.
        configuration.evictionHeadroomBytes = 0
        let disk = try DiskTier(storage: SimulatedStorage(seed: 11), logger: Store.logger)
        let store = try Store.store(configuration: configuration, disk: disk)
        let sequence = Array(Store.tokens[0..<64])  // 4 pages: the whole quota
        _ = try await store.put(Store.alice, owner: 1, modelID: Store.model.id, tokens: sequence, dataStart: 0,
                                chunks: Store.chunks(from: 0, to: 64), durable: false)
        let addresses = store.locate(Store.alice, Store.model, sequence).map(\.address)
        #expect(addresses.count == 4)
        #expect(store.state.withLock { s in addresses.allSatisfy { s.hold($0) } })
        #expect(!store.evictFromRAM(addresses[0]), "a held page is not evicted")
        #expect(store.state.withLock { $0.tenantLeased[Store.alice] } == nil, "holds are counted as the tenant's leases")
        #expect(store.status().first { $0.name == "leases" }?.value == 0)
        let got = try await store.get(Store.alice, owner: 2, modelID: Store.model.id, tokens: sequence, maxTokens: 0)
        #expect(got.tokens == 64, "holds took \(64 - got.tokens) tokens of the tenant's quota")
        try store.release(Store.alice, leaseID: got.leaseID)
        store.state.withLock { s in for address in addresses { s.endHold(address) } }
        #expect(store.state.withLock { s in addresses.allSatisfy { s.resident[$0].map { $0.holds == 0 } ?? true } })
        await disk.close()
    }

    /// The disk budget may delete a page's disk copy while its RAM copy waits in an eviction
    /// group (found in review: the group's "already on disk" was read before the group's write
    /// awaited). Eviction checks the disk copy when it frees the RAM one, so the page stays.
    @Test func aPageWhoseDiskCopyWentIsNotEvicted() async throws {
        let disk = try DiskTier(storage: SimulatedStorage(seed: 12), logger: Store.logger)
        let store = try Store.store(disk: disk)
        let sequence = Array(Store.tokens[0..<16])
        _ = try await store.put(Store.alice, owner: 1, modelID: Store.model.id, tokens: sequence, dataStart: 0,
                                chunks: Store.chunks(from: 0, to: 16), durable: true)
        let address = store.locate(Store.alice, Store.model, sequence)[0].address
        #expect(disk.contains(address))
        #expect(try await disk.delete(address), "the disk budget's deletion, as it happens")
        #expect(!store.evictFromRAM(address), "the RAM copy is the last one")
        let got = try await store.get(Store.alice, owner: 2, modelID: Store.model.id, tokens: sequence, maxTokens: 0)
        #expect(got.tokens == 16)
        try store.release(Store.alice, leaseID: got.leaseID)
        await disk.close()
    }

    /// An evictor that stopped because every page it could take was leased starts again when a
    /// RELEASE frees them (otherwise RAM stays short of its headroom until the next put).
    @Test func aReleaseWakesAnEvictorThatStalledOnLeasedPages() async throws {
        let pageBytes = Self.extentBytes(16 * Store.model.bytesPerToken)
        var configuration = TieredStore.Configuration()
        configuration.ramBudgetBytes = 8 * pageBytes
        configuration.tenantRAMQuotaBytes = 8 * pageBytes
        configuration.evictionHeadroomBytes = 4 * pageBytes
        configuration.minResidenceMicros = 0
        let disk = try DiskTier(storage: SimulatedStorage(seed: 13), logger: Store.logger)
        let store = try Store.store(configuration: configuration, disk: disk)
        func put(_ tokens: [UInt32]) async throws {
            _ = try await store.put(Store.alice, owner: 1, modelID: Store.model.id, tokens: tokens, dataStart: 0,
                                    chunks: Store.chunks(from: 0, to: tokens.count), durable: false)
        }
        // The evictor waits at its gate while 7 pages are put and leased (7 pages leave less
        // than half the headroom free), then finds every page leased and stalls.
        await store.evictionGate.enter()
        let sequence = Array(Store.tokens[0..<112])
        try await put(sequence)
        let leased = try await store.get(Store.alice, owner: 2, modelID: Store.model.id, tokens: sequence, maxTokens: 0)
        #expect(leased.tokens == 112)
        store.evictionGate.leave()
        await store.evictionSettled()
        let ram = { store.status().first { $0.name == "ram_bytes" }!.value }
        #expect(ram() == UInt64(7 * pageBytes), "every page is leased: nothing can go")
        try store.release(Store.alice, leaseID: leased.leaseID)
        await store.evictionSettled()
        #expect(ram() <= UInt64(4 * pageBytes), "the release woke the evictor, which restored its headroom")
        await disk.close()
    }

    static func extentBytes(_ bytes: Int) -> Int { (bytes + 4095) / 4096 * 4096 }
}
