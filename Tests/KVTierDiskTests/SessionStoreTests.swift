import KVTierCodec
import KVTierCore
import KVTierIO
import KVTierStore
import KVTierStoreTesting
import KVTierTools
import Logging
import Testing

/// Named sessions in the tiered store: created by puts, kept in the catalog journal across
/// restarts and crashes, pinned, expired, forked, and prefetched when resumed.
@Suite struct SessionStoreTests {
    typealias T = TieredStoreTests
    static let model = T.model
    static let alice = T.alice
    static let bob = T.bob
    static let pageBytes = 16 * T.model.bytesPerToken  // 8 KiB

    /// A store over `storage`: disk tier and catalog both kept there, as kvtierd does.
    static func open(_ storage: SimulatedStorage, ramBudget: Int = 64 << 20, tenantRAMQuota: Int? = nil,
                     minResidenceMicros: UInt64 = 0) throws -> (TieredStore, DiskTier) {
        let disk = try DiskTier(storage: storage, logger: T.logger)
        let catalog = try SessionCatalog(storage: storage, logger: T.logger)
        var configuration = TieredStore.Configuration()
        configuration.ramBudgetBytes = ramBudget
        configuration.tenantRAMQuotaBytes = tenantRAMQuota ?? ramBudget
        configuration.arenaBytes = 256 << 20
        configuration.diskCodec = Codec(.fp16, .lz4)
        configuration.minResidenceMicros = minResidenceMicros
        let store = TieredStore(configuration: configuration, disk: disk, catalog: catalog, logger: T.logger) { tenant in
            try ArenaPageMemory(name: "kvtier-session-test-\(tenant)", capacity: 256 << 20, stagingCapacity: 64 << 20, logger: T.logger)
        }
        try store.register(model)
        return (store, disk)
    }

    /// KV of tokens `start..<start+count` in page layout, each row derived from its token
    /// position, layer and part: chunks of any split compose into the same pages.
    static func rows(_ start: Int, _ count: Int) -> PageBuffer {
        let row = model.kvHeads * model.headDim * model.elementType.byteWidth
        let buffer = PageBuffer(overwrittenByteCount: count * model.bytesPerToken)
        var at = 0
        for section in 0..<(model.layers * 2) {
            for token in start..<(start + count) {
                let bytes = TestPattern.finiteFloat16(bytes: row, seed: UInt64(token) << 8 | UInt64(section)).copyBytes()
                UnsafeMutableRawBufferPointer(rebasing: buffer.bytes[at..<at + row]).copyBytes(from: bytes)
                at += row
            }
        }
        return buffer
    }

    static func chunks(from dataStart: Int, to end: Int) -> [TieredStore.PutChunk] {
        T.chunks(from: dataStart, to: end, rows: rows)
    }

    @discardableResult
    static func put(_ store: TieredStore, _ tokens: [UInt32], from start: Int, session: String?,
                    tenant: TenantID = alice) async throws -> TieredStore.PutResult {
        try await store.put(tenant, owner: 1, modelID: model.id, tokens: tokens, dataStart: start,
                            chunks: chunks(from: start, to: tokens.count), durable: false, session: session)
    }

    /// Whether a GET of `tokens` serves all of them with the bytes `T.rows` made.
    static func servesExactly(_ store: TieredStore, _ tokens: [UInt32], tenant: TenantID = alice) async throws -> Bool {
        let got = try await store.get(tenant, owner: 9, modelID: model.id, tokens: tokens, maxTokens: 0)
        defer { try? store.release(tenant, leaseID: got.leaseID) }
        guard got.tokens == tokens.count else { return false }
        let memory = try store.memory(for: tenant)
        for (i, page) in got.pages.enumerated() {
            let rows = min(16, tokens.count - i * 16)
            let expected = Self.rows(i * 16, rows).copyBytes()
            guard memory.buffer(page.extent).copyBytes().prefix(expected.count) == expected[...] else { return false }
        }
        return true
    }

    @Test func aPutNamesASessionAndExtendsIt() async throws {
        let (store, disk) = try Self.open(SimulatedStorage(seed: 11))
        let tokens = Array(T.tokens[0..<70])
        try await Self.put(store, Array(tokens[0..<40]), from: 0, session: "chat")
        var info = try store.sessionDetail(Self.alice, name: "chat")
        #expect(info.session.tokens == Array(tokens[0..<40]) && info.ramTokens == 40 && !info.session.pinned)
        #expect(disk.stats.pages == 3, "a session put is durable: every page on disk")

        try await Self.put(store, tokens, from: 40, session: "chat")
        info = try store.sessionDetail(Self.alice, name: "chat")
        #expect(info.session.tokens == tokens)
        #expect(try await Self.servesExactly(store, tokens))
        let resumed = try store.resumeSession(Self.alice, name: "chat")
        #expect(resumed.session.tokens == tokens && resumed.prefetch == nil, "all in RAM: nothing to prefetch")
        #expect(store.sessions(Self.alice).map(\.session.name) == ["chat"])
        await disk.close()
    }

    @Test func sessionsSurviveACleanRestartAndACrash() async throws {
        let storage = SimulatedStorage(seed: 12)
        let tokens = Array(T.tokens[0..<70])
        do {
            let (store, disk) = try Self.open(storage)
            try await Self.put(store, Array(tokens[0..<40]), from: 0, session: "clean")
            try store.setSessionTTL(Self.alice, name: "clean", seconds: 3600)
            await disk.close()
        }
        do {
            let (store, _) = try Self.open(storage)
            let info = try store.sessionDetail(Self.alice, name: "clean")
            #expect(info.session.tokens == Array(tokens[0..<40]) && info.session.ttlSeconds == 3600 && info.diskTokens == 40)
            #expect(try await Self.servesExactly(store, Array(tokens[0..<40])))
            // Acknowledged, then power loss without a clean close.
            try await Self.put(store, tokens, from: 40, session: "crash")
            storage.crash()
        }
        let (store, disk) = try Self.open(storage)
        #expect(store.sessions(Self.alice).map(\.session.name).sorted() == ["clean", "crash"])
        let crash = try store.sessionDetail(Self.alice, name: "crash")
        #expect(crash.session.tokens == tokens && crash.diskTokens == 70, "\(crash)")
        #expect(try await Self.servesExactly(store, tokens))
        await disk.close()
    }

    /// A fork shares the pages; extending the original completes (and would drop) the shorter
    /// last page, which the fork still ends on, so it must stay.
    @Test func aForkKeepsItsTailWhenTheOriginalGrows() async throws {
        let (store, disk) = try Self.open(SimulatedStorage(seed: 13))
        let tokens = Array(T.tokens[0..<80])
        try await Self.put(store, Array(tokens[0..<70]), from: 0, session: "chat")
        let fork = try store.forkSession(Self.alice, from: "chat", to: "branch")
        #expect(fork.session.tokens == Array(tokens[0..<70]) && fork.ramTokens == 70)
        try await Self.put(store, tokens, from: 70, session: "chat")
        #expect(try store.sessionDetail(Self.alice, name: "chat").session.tokens == tokens)
        let branch = try store.sessionDetail(Self.alice, name: "branch")
        #expect(branch.session.tokens == Array(tokens[0..<70]) && branch.ramTokens + branch.diskTokens == 70, "\(branch)")
        #expect(try await Self.servesExactly(store, Array(tokens[0..<70])))
        #expect(try await Self.servesExactly(store, tokens))

        // Without a session holding it, the shorter page goes (no duplicate storage).
        try store.deleteSession(Self.alice, name: "branch")
        try await Self.put(store, Array(T.tokens[0..<100]), from: 0, session: nil)
        try await Self.put(store, Array(T.tokens[0..<90]), from: 0, session: nil)  // a 10-token tail page
        #expect(try store.lookup(Self.alice, modelID: Self.model.id, tokens: Array(T.tokens[0..<90])).cachedTokens == 90)
        try await Self.put(store, Array(T.tokens[0..<96]), from: 90, session: nil)
        #expect(try store.lookup(Self.alice, modelID: Self.model.id, tokens: Array(T.tokens[0..<90])).cachedTokens == 80)
        #expect(throws: StoreError.self) { try store.forkSession(Self.alice, from: "chat", to: "chat") }
        #expect(throws: StoreError.self) { try store.forkSession(Self.alice, from: "missing", to: "x") }
        await disk.close()
    }

    /// However the extending put sends its data (from the cached length, or resending the
    /// page's first rows), the shorter page it supersedes goes, and the store keeps one copy.
    @Test(arguments: [90, 80])
    func anExtendingPutDropsTheShorterPage(dataStart: Int) async throws {
        let (store, disk) = try Self.open(SimulatedStorage(seed: 19))
        let short = Array(T.tokens[0..<90]), long = Array(T.tokens[0..<96])
        try await Self.put(store, short, from: 0, session: nil)
        try await Self.put(store, long, from: dataStart, session: nil)
        #expect(try store.lookup(Self.alice, modelID: Self.model.id, tokens: short).cachedTokens == 80)
        #expect(store.pageSummaries(Self.alice, modelID: nil).count == 6)
        #expect(try await Self.servesExactly(store, long))
        await disk.close()
    }

    @Test func tenantsSeeNoneOfEachOthersSessions() async throws {
        let (store, disk) = try Self.open(SimulatedStorage(seed: 14))
        try await Self.put(store, Array(T.tokens[0..<40]), from: 0, session: "secret")
        #expect(store.sessions(Self.bob).isEmpty)
        #expect(throws: StoreError.self) { try store.sessionDetail(Self.bob, name: "secret") }
        #expect(throws: StoreError.self) { try store.resumeSession(Self.bob, name: "secret") }
        #expect(throws: StoreError.self) { try store.forkSession(Self.bob, from: "secret", to: "mine") }
        #expect(throws: StoreError.self) { try store.setSessionPinned(Self.bob, name: "secret", pinned: true) }
        #expect(throws: StoreError.self) { try store.setSessionTTL(Self.bob, name: "secret", seconds: 1) }
        #expect(throws: StoreError.self) { try store.deleteSession(Self.bob, name: "secret") }
        // Bob's own session of the same name is another session.
        try await Self.put(store, Array(T.tokens[0..<20]), from: 0, session: "secret", tenant: Self.bob)
        #expect(try store.sessionDetail(Self.bob, name: "secret").session.tokens.count == 20)
        #expect(try store.sessionDetail(Self.alice, name: "secret").session.tokens.count == 40)
        await disk.close()
    }

    @Test func ttlExpiresUnpinnedSessionsOnly() async throws {
        let (store, disk) = try Self.open(SimulatedStorage(seed: 15))
        try await Self.put(store, Array(T.tokens[0..<20]), from: 0, session: "short")
        try await Self.put(store, Array(T.tokens[0..<20]), from: 0, session: "kept")
        try store.setSessionTTL(Self.alice, name: "short", seconds: 1)
        try store.setSessionTTL(Self.alice, name: "kept", seconds: 1)
        _ = try store.setSessionPinned(Self.alice, name: "kept", pinned: true)
        try await Task.sleep(for: .milliseconds(2100))
        #expect(throws: StoreError.self) { try store.sessionDetail(Self.alice, name: "short") }
        #expect(store.expireSessions() == 0, "the lazy check above expired it already")
        #expect(try store.sessionDetail(Self.alice, name: "kept").session.pinned)
        #expect(try store.lookup(Self.alice, modelID: Self.model.id, tokens: Array(T.tokens[0..<20])).cachedTokens == 20,
                "an expired session's pages stay as cache")
        await disk.close()
    }

    @Test func pinnedPagesStayInRAMAndPinsAreBounded() async throws {
        let (store, disk) = try Self.open(SimulatedStorage(seed: 16), ramBudget: 8 * Self.pageBytes)
        try await Self.put(store, Array(T.tokens[0..<48]), from: 0, session: "pinned")  // 3 pages
        _ = try store.setSessionPinned(Self.alice, name: "pinned", pinned: true)
        // Other traffic far over the RAM budget.
        let other: [UInt32] = (0..<160).map { 10_000 + UInt32($0) }
        try await store.put(Self.alice, owner: 1, modelID: Self.model.id, tokens: other, dataStart: 0,
                            chunks: T.chunks(from: 0, to: 160), durable: false)
        // Eviction runs behind the put: wait for it to settle.
        await store.evictionSettled()
        let info = try store.sessionDetail(Self.alice, name: "pinned")
        #expect(info.ramTokens == 48, "pinned pages are not evicted: \(info)")
        let status = Dictionary(uniqueKeysWithValues: store.status().map { ($0.name, $0.value) })
        #expect(status["ram_bytes"]! <= UInt64(8 * Self.pageBytes) && status["pinned_bytes"]! == UInt64(3 * Self.pageBytes))

        // Pinning more than half the RAM budget is refused.
        try await Self.put(store, Array(T.tokens[100..<164]), from: 0, session: "big")  // 4 more pages
        #expect(throws: StoreError.self) { try store.setSessionPinned(Self.alice, name: "big", pinned: true) }
        _ = try store.setSessionPinned(Self.alice, name: "pinned", pinned: false)
        #expect(try store.setSessionPinned(Self.alice, name: "big", pinned: true).session.name == "big")
        await disk.close()
    }

    /// Finding 6, RAM side: one tenant's pins may hold half its RAM quota, not the whole pinned
    /// share of the budget, so other tenants can still pin.
    @Test func aTenantsPinsAreBoundedByItsQuota() async throws {
        // Budget 16 pages, quota 8: pins of all tenants 8 pages, of one tenant 4.
        let (store, disk) = try Self.open(SimulatedStorage(seed: 18), ramBudget: 16 * Self.pageBytes, tenantRAMQuota: 8 * Self.pageBytes)
        try await Self.put(store, Array(T.tokens[0..<48]), from: 0, session: "first")  // 3 pages
        _ = try store.setSessionPinned(Self.alice, name: "first", pinned: true)
        try await Self.put(store, Array(T.tokens[100..<132]), from: 0, session: "second")  // 2 more
        do {
            _ = try store.setSessionPinned(Self.alice, name: "second", pinned: true)
            Issue.record("alice pinned 5 pages with a quota of 8 (half: 4)")
        } catch {
            guard case .overBudget(let message) = error else { throw error }
            #expect(message.contains("tenantRAMQuota"), "the refusal names the limit: \(message)")
        }
        try await Self.put(store, Array(T.tokens[0..<48]), from: 0, session: "bobs", tenant: Self.bob)
        #expect(try store.setSessionPinned(Self.bob, name: "bobs", pinned: true).session.name == "bobs", "bob pins within his own share")
        await disk.close()
    }

    @Test func resumingPrefetchesTheSessionsDiskPages() async throws {
        // Prefetch may fill half the RAM budget: 5 pages, more than the session's 4.
        let (store, disk) = try Self.open(SimulatedStorage(seed: 17), ramBudget: 10 * Self.pageBytes)
        let tokens = Array(T.tokens[0..<64])
        try await Self.put(store, tokens, from: 0, session: "chat")
        // Push the session out of RAM.
        let other: [UInt32] = (0..<160).map { 20_000 + UInt32($0) }
        try await store.put(Self.alice, owner: 1, modelID: Self.model.id, tokens: other, dataStart: 0,
                            chunks: T.chunks(from: 0, to: 160), durable: false)
        let before = try store.sessionDetail(Self.alice, name: "chat")
        #expect(before.diskTokens > 0, "\(before)")
        let resumed = try store.resumeSession(Self.alice, name: "chat")
        let loaded = await resumed.prefetch?.value ?? 0
        #expect(loaded == before.diskTokens / 16)
        let after = try store.sessionDetail(Self.alice, name: "chat")
        #expect(after.ramTokens == 64, "\(after)")
        #expect(try await Self.servesExactly(store, tokens))
        let status = Dictionary(uniqueKeysWithValues: store.status().map { ($0.name, $0.value) })
        #expect(status["prefetch_loaded"]! == UInt64(loaded) && status["prefetch_useful"]! == UInt64(loaded))
        await disk.close()
    }

    /// Concurrent GETs (and a prefetch) of the same disk pages share one read per page.
    @Test func concurrentLoadsReadEachPageOnce() async throws {
        let (store, disk) = try Self.open(SimulatedStorage(seed: 20))
        let tokens = Array(T.tokens[0..<64])
        try await Self.put(store, tokens, from: 0, session: "chat")
        _ = try await store.evict(Self.alice, modelID: nil, tokens: nil, deleteFromDisk: false)
        let prefetch = try store.resumeSession(Self.alice, name: "chat").prefetch
        let served = try await withThrowingTaskGroup(of: Bool.self) { group in
            for _ in 0..<4 { group.addTask { try await Self.servesExactly(store, tokens) } }
            return try await group.reduce(true) { $0 && $1 }
        }
        let prefetched = await prefetch?.value ?? 0
        #expect(served)
        let status = Dictionary(uniqueKeysWithValues: store.status().map { ($0.name, $0.value) })
        #expect(status["promotions"]! + status["prefetch_loaded"]! == 4, "\(status)")
        #expect(status["prefetch_loaded"]! == UInt64(prefetched))
        await disk.close()
    }

    @Test func badNamesAndModelMismatchesAreRefused() async throws {
        let (store, disk) = try Self.open(SimulatedStorage(seed: 18))
        for name in ["", String(repeating: "x", count: 256), "tab\there"] {
            await #expect(throws: StoreError.self) { try await Self.put(store, Array(T.tokens[0..<20]), from: 0, session: name) }
        }
        try await Self.put(store, Array(T.tokens[0..<20]), from: 0, session: "chat")
        let other = ModelSpec(id: 0x78, name: "other", layers: 2, kvHeads: 2, headDim: 32, elementType: .float16, pageTokens: 16)
        try store.register(other)
        await #expect(throws: StoreError.self) {
            try await store.put(Self.alice, owner: 1, modelID: other.id, tokens: Array(T.tokens[0..<20]), dataStart: 0,
                                chunks: T.chunks(from: 0, to: 20), durable: false, session: "chat")
        }
        #expect(try store.sessionDetail(Self.alice, name: "chat").session.modelID == Self.model.id)
        await disk.close()
    }
}

/// Finding 6 (disk part): one tenant's writes must not delete another tenant's session pages.
@Suite struct DiskQuotaTests {
    typealias S = SessionStoreTests

    static func open(_ storage: SimulatedStorage, diskBudget: Int, tenantQuota: Int? = nil) throws -> (TieredStore, DiskTier) {
        var diskConfiguration = DiskTierConfiguration()
        diskConfiguration.budgetBytes = diskBudget
        diskConfiguration.segmentBytes = 64 << 10
        if let tenantQuota { diskConfiguration.tenantBudgetBytes = tenantQuota }
        let disk = try DiskTier(storage: storage, configuration: diskConfiguration, logger: S.T.logger)
        let catalog = try SessionCatalog(storage: storage, logger: S.T.logger)
        var configuration = TieredStore.Configuration()
        configuration.ramBudgetBytes = 64 << 20
        configuration.arenaBytes = 256 << 20
        configuration.diskCodec = Codec(.fp16, .lz4)
        let store = TieredStore(configuration: configuration, disk: disk, catalog: catalog, logger: S.T.logger) { tenant in
            try ArenaPageMemory(name: "kvtier-quota-test-\(tenant)", capacity: 256 << 20, stagingCapacity: 16 << 20, logger: S.T.logger)
        }
        try store.register(S.model)
        return (store, disk)
    }

    static func sequence(_ n: Int) -> [UInt32] { S.T.tokens[0..<48].map { $0 &+ UInt32(n * 7919) } }

    @Test func anotherTenantsWritesNeverDeleteASessionsPages() async throws {
        let storage = SimulatedStorage(seed: 60)
        let budget = 320 << 10
        let victim = Array(S.T.tokens[0..<40])
        do {
            let (store, disk) = try Self.open(storage, diskBudget: budget)
            try await S.put(store, victim, from: 0, session: "alice-chat")
            // Bob writes sessions worth three times the budget, one after another.
            var refused = 0
            for n in 0..<20 {
                do { try await S.put(store, Self.sequence(n), from: 0, session: "bob-\(n)", tenant: S.bob) } catch { refused += 1 }
            }
            #expect(refused < 20, "bob's own older pages make room for his newer ones")
            // The budget is enforced after each group: closing waits for the writer's last pass.
            await disk.close()
            #expect(disk.stats.liveBytes <= budget, "the disk budget holds")
        }
        // After a restart nothing is in RAM: every token must come from Alice's disk pages.
        let (store, disk) = try Self.open(storage, diskBudget: budget)
        #expect(try store.sessionDetail(S.alice, name: "alice-chat").diskTokens == 40)
        #expect(try await S.servesExactly(store, victim), "alice's session must serve all its tokens byte-exact")
        await disk.close()
    }

    @Test func aTenantOverItsQuotaEvictsItsOwnPagesOrIsRefused() async throws {
        let storage = SimulatedStorage(seed: 61)
        let quota = 96 << 10
        let (store, disk) = try Self.open(storage, diskBudget: 4 << 20, tenantQuota: quota)
        try await S.put(store, Array(S.T.tokens[0..<40]), from: 0, session: "alice-chat")
        var refusals: [String] = []
        for n in 0..<12 {
            do { try await S.put(store, Self.sequence(n), from: 0, session: "bob-\(n)", tenant: S.bob) } catch {
                refusals.append("\(error)")
            }
        }
        #expect(refusals.allSatisfy { $0.contains("quota") }, "\(refusals)")
        #expect(try await S.servesExactly(store, Array(S.T.tokens[0..<40])))
        // The quota is enforced after each group: closing waits for the writer's last pass.
        await disk.close()
        let bobBytes = disk.pages().filter { $0.address.tenant == S.bob }.reduce(0) { $0 + $1.diskBytes }
        #expect(bobBytes <= quota, "bob holds \(bobBytes) bytes on disk, over his quota of \(quota)")
        #expect(disk.pages().contains { $0.address.tenant == S.alice }, "alice's pages are not bob's to evict")
    }
}
