import KVTierCore
import KVTierDaemon
import KVTierProtocol
import KVTierServer
import KVTierStore
import KVTierStoreTesting
import Testing

extension StoreRequestHandler {
    /// The reply when the request is answered at once on the connection's thread; nil when it
    /// leaves pending work (which is dropped: call only where that changes nothing).
    func handleNow(_ request: Request, context: ConnectionContext) -> Reply? {
        if case .reply(let reply) = handle(request, context: context) { return reply }
        return nil
    }

    /// The reply, after the pending work if the request leaves some.
    func handleToEnd(_ request: Request, context: ConnectionContext) async -> Reply {
        switch handle(request, context: context) {
        case .reply(let reply): return reply
        case .pending(let rest): return await rest()
        }
    }
}

/// The daemon's one path per request (`StoreRequestHandler.handle` over the store's `beginGet` /
/// `beginPut`): answered at once when nothing waits (same replies and bytes as when it is
/// repeated), pending work for everything that needs the disk, a session, durability, a merge
/// with a stored partial page or room in RAM.
@Suite struct StoreRequestPathTests {
    typealias Store = TieredStoreTests
    static let modelID = Store.model.id

    static func context(_ connection: UInt64, tenant: TenantID = Store.alice, sharedMemory: Bool = true) -> ConnectionContext {
        ConnectionContext(connectionID: connection, tenant: tenant, peer: PeerCredentials(pid: 1, uid: tenant.rawValue, gid: 0),
                          protocolVersion: ProtocolVersion.current, clientName: "request-path-test", sharedMemory: sharedMemory)
    }

    /// Inline data for tokens [dataStart, end): each chunk's rows, page by page.
    static func inlineData(from dataStart: Int, to end: Int) -> [UInt8] {
        Store.chunks(from: dataStart, to: end).flatMap { chunk -> [UInt8] in
            guard case .bytes(let buffer) = chunk else { return [] }
            return buffer.copyBytes()
        }
    }

    static func handler(_ store: TieredStore) -> StoreRequestHandler {
        StoreRequestHandler(store: store, defaultPageTokens: Store.model.pageTokens)
    }

    @Test(arguments: [false, true])
    func aResidentGetIsAnsweredAtOnceWithTheAsyncPathsBytes(inline: Bool) async throws {
        let store = try Store.store()
        let handler = Self.handler(store)
        let sequence = Array(Store.tokens[0..<40])
        _ = try await store.put(Store.alice, owner: 1, modelID: Self.modelID, tokens: sequence, dataStart: 0,
                                chunks: Store.chunks(from: 0, to: 40), durable: false)
        let request = Request.get(Get(modelID: Self.modelID, tokens: sequence, inline: inline))
        guard case .get(let fast)? = handler.handleNow(request, context: Self.context(7)),
              case .get(let slow) = await handler.handleToEnd(request, context: Self.context(8)) else {
            Issue.record("a GET of RAM-resident pages was not answered at once, or failed")
            return
        }
        #expect(fast.tokens == 40 && slow.tokens == 40)
        if inline {
            #expect(fast.leaseID == 0 && slow.leaseID == 0, "an inline reply holds no lease")
            #expect(fast.data == slow.data)
            #expect(fast.data == .inline(Self.inlineData(from: 0, to: 40)))
        } else {
            #expect(fast.data == slow.data, "the same pages, in place")
            #expect(fast.leaseID != slow.leaseID)
            guard case .extents(let extents) = fast.data else { return }
            #expect(extents.map(\.tokens) == [16, 16, 8])
            #expect(store.status().first { $0.name == "leases" }?.value == 2)
            #expect(handler.handleNow(.release(Release(leaseID: fast.leaseID)), context: Self.context(7)) == .release)
            #expect(handler.handleNow(.release(Release(leaseID: slow.leaseID)), context: Self.context(8)) == .release)
            guard case .error(_, let again)? = handler.handleNow(.release(Release(leaseID: fast.leaseID)), context: Self.context(7)) else {
                Issue.record("a second RELEASE of the same lease was accepted")
                return
            }
            #expect(again.error == .notFound)
        }
        #expect(store.status().first { $0.name == "leases" }?.value == 0)
    }

    @Test func maxTokensAndOtherTenantsAgreeWithTheAsyncPath() async throws {
        let store = try Store.store()
        let handler = Self.handler(store)
        let sequence = Array(Store.tokens[0..<40])
        _ = try await store.put(Store.alice, owner: 1, modelID: Self.modelID, tokens: sequence, dataStart: 0,
                                chunks: Store.chunks(from: 0, to: 40), durable: false)
        for (tenant, maxTokens) in [(Store.alice, UInt32(20)), (Store.alice, 16), (Store.alice, 1), (Store.bob, 0)] {
            let request = Request.get(Get(modelID: Self.modelID, tokens: sequence, maxTokens: maxTokens, inline: true))
            let fast = handler.handleNow(request, context: Self.context(3, tenant: tenant))
            let slow = await handler.handleToEnd(request, context: Self.context(4, tenant: tenant))
            // Bob's first request creates his memory, at once too; he sees nothing of alice's.
            #expect(fast == slow, "tenant \(tenant), maxTokens \(maxTokens)")
            if tenant == Store.bob, case .get(let reply)? = fast { #expect(reply.tokens == 0) }
        }
        // Another tenant can neither see nor release alice's lease.
        guard case .get(let leased)? = handler.handleNow(.get(Get(modelID: Self.modelID, tokens: sequence)), context: Self.context(3)) else {
            Issue.record("no lease")
            return
        }
        guard case .error(_, let refused)? = handler.handleNow(.release(Release(leaseID: leased.leaseID)),
                                                                       context: Self.context(5, tenant: Store.bob)) else {
            Issue.record("bob released alice's lease")
            return
        }
        #expect(refused.error == .notFound)
        #expect(handler.handleNow(.release(Release(leaseID: leased.leaseID)), context: Self.context(3)) == .release)
    }

    @Test func aGetThatNeedsTheDiskTakesTheAsyncPathAndComesBackExact() async throws {
        let disk = try DiskTier(storage: SimulatedStorage(seed: 3), logger: Store.logger)
        let pageBytes = 16 * Store.model.bytesPerToken
        let store = try Store.store(ramBudget: 4 * pageBytes, disk: disk)
        let handler = Self.handler(store)
        let sequence = Array(Store.tokens[0..<160])  // 10 pages, 6 or more of them evicted
        _ = try await store.put(Store.alice, owner: 1, modelID: Self.modelID, tokens: sequence, dataStart: 0,
                                chunks: Store.chunks(from: 0, to: 160), durable: false)
        // Eviction runs behind the put: wait for it to settle.
        await store.evictionSettled()
        #expect(try store.lookup(Store.alice, modelID: Self.modelID, tokens: sequence).diskTokens >= 96)
        let request = Request.get(Get(modelID: Self.modelID, tokens: sequence, inline: true))
        #expect(handler.handleNow(request, context: Self.context(2)) == nil, "promotion from disk is the async path's")
        guard case .get(let slow) = await handler.handleToEnd(request, context: Self.context(2)) else {
            Issue.record("GET failed")
            return
        }
        #expect(slow.tokens == 160)
        #expect(slow.data == .inline(Self.inlineData(from: 0, to: 160)))
    }

    @Test func aWholePagePutIsStoredAtOnceAndReadBackByEitherPath() async throws {
        let store = try Store.store()
        let handler = Self.handler(store)
        let sequence = Array(Store.tokens[0..<40])
        let put = Request.put(Put(modelID: Self.modelID, tokens: sequence, dataStart: 0, data: .inline(Self.inlineData(from: 0, to: 40))))
        #expect(handler.handleNow(put, context: Self.context(1)) == .put(PutReply(cachedTokens: 40, newPages: 3)))
        #expect(handler.handleNow(put, context: Self.context(1)) == .put(PutReply(cachedTokens: 40, newPages: 0)),
                "stored once")
        let get = Request.get(Get(modelID: Self.modelID, tokens: sequence, inline: true))
        let slow = await handler.handleToEnd(get, context: Self.context(2))
        #expect(slow == .get(GetReply(tokens: 40, leaseID: 0, data: .inline(Self.inlineData(from: 0, to: 40)))))
        let status = Dictionary(uniqueKeysWithValues: store.status().map { ($0.name, $0.value) })
        #expect(status["puts"] == 2 && status["pages_stored"] == 3 && status["pages_deduplicated"] == 3)
    }

    /// A whole-page put over a stored shorter page takes the async path, which drops that page.
    @Test func aPutSupersedingAPartialPageIsLeftToTheAsyncPath() async throws {
        let store = try Store.store()
        let handler = Self.handler(store)
        let short = Array(Store.tokens[0..<40]), long = Array(Store.tokens[0..<48])
        let first = Request.put(Put(modelID: Self.modelID, tokens: short, dataStart: 0, data: .inline(Self.inlineData(from: 0, to: 40))))
        #expect(handler.handleNow(first, context: Self.context(1)) != nil)
        let second = Request.put(Put(modelID: Self.modelID, tokens: long, dataStart: 32, data: .inline(Self.inlineData(from: 32, to: 48))))
        #expect(handler.handleNow(second, context: Self.context(1)) == nil)
        #expect(await handler.handleToEnd(second, context: Self.context(1)) == .put(PutReply(cachedTokens: 48, newPages: 1)))
        #expect(try store.lookup(Store.alice, modelID: Self.modelID, tokens: short).cachedTokens == 32, "the 8-token page is gone")
    }

    @Test func aStagedPutAdoptsTheExtentsAndEndsTheAllocLease() async throws {
        let store = try Store.store()
        let handler = Self.handler(store)
        let sequence = Array(Store.tokens[0..<32])
        let pageBytes = 16 * Store.model.bytesPerToken
        guard case .alloc(let staging)? = handler.handleNow(.alloc(Alloc(byteCounts: [UInt64(pageBytes), UInt64(pageBytes)])),
                                                                    context: Self.context(1)) else {
            Issue.record("ALLOC failed")
            return
        }
        let memory = try store.memory(for: Store.alice)
        for (index, extent) in staging.extents.enumerated() {
            let rows = Store.rows(index * 16, 16)
            memory.buffer(Extent(offset: Int(extent.offset), length: Int(extent.bytes))).bytes.copyMemory(from: rows.readOnly)
        }
        let put = Request.put(Put(modelID: Self.modelID, tokens: sequence, dataStart: 0, data: .extents(staging.extents.map {
            WireExtent(offset: $0.offset, bytes: $0.bytes, tokens: 16)
        })))
        #expect(handler.handleNow(put, context: Self.context(1)) == .put(PutReply(cachedTokens: 32, newPages: 2)))
        #expect(store.status().first { $0.name == "leases" }?.value == 0, "the ALLOC lease ended with its last extent")
        guard case .get(let got)? = handler.handleNow(.get(Get(modelID: Self.modelID, tokens: sequence)), context: Self.context(1)),
              case .extents(let served) = got.data else {
            Issue.record("GET failed")
            return
        }
        #expect(served.map(\.offset) == staging.extents.map(\.offset), "adopted, not copied")
        // Another connection may not name this connection's staging extents.
        guard case .error(_, let refused)? = handler.handleNow(put, context: Self.context(9)) else {
            Issue.record("a PUT naming another connection's staging extents was accepted")
            return
        }
        #expect(refused.error == .invalidArgument)
    }

    @Test func sessionsDurabilityAndPartialPagesTakeTheAsyncPath() async throws {
        let store = try Store.store()
        let handler = Self.handler(store)
        let sequence = Array(Store.tokens[0..<40])
        let data = PageData.inline(Self.inlineData(from: 0, to: 40))
        let session = Request.put(Put(modelID: Self.modelID, session: "chat-1", tokens: sequence, dataStart: 0, data: data))
        #expect(handler.handleNow(session, context: Self.context(1)) == nil, "a PUT naming a session")
        let durable = Request.put(Put(modelID: Self.modelID, durable: true, tokens: sequence, dataStart: 0, data: data))
        #expect(handler.handleNow(durable, context: Self.context(1)) == nil, "a durable PUT")
        #expect(store.status().first { $0.name == "puts" }?.value == 0)

        // 20 tokens: a page and a 4-token partial page, both whole from token 0: at once.
        let first = Request.put(Put(modelID: Self.modelID, tokens: Array(sequence[0..<20]), dataStart: 0,
                                    data: .inline(Self.inlineData(from: 0, to: 20))))
        #expect(handler.handleNow(first, context: Self.context(1)) == .put(PutReply(cachedTokens: 20, newPages: 2)))
        // Extending from token 20 completes the partial page (a merge): the async path's.
        let extend = Request.put(Put(modelID: Self.modelID, tokens: sequence, dataStart: 20, data: .inline(Self.inlineData(from: 20, to: 40))))
        #expect(handler.handleNow(extend, context: Self.context(1)) == nil)
        #expect(await handler.handleToEnd(extend, context: Self.context(1)) == .put(PutReply(cachedTokens: 40, newPages: 2)))
        // The completed page holds the first put's rows 16..<20, then the second's: both paths
        // serve the same bytes.
        let get = Request.get(Get(modelID: Self.modelID, tokens: sequence, inline: true))
        let fast = handler.handleNow(get, context: Self.context(1))
        let slow = await handler.handleToEnd(get, context: Self.context(1))
        #expect(fast != nil && fast == slow)
        // A request the store refuses is refused at once.
        let early = Request.put(Put(modelID: Self.modelID, tokens: Array(Store.tokens[100..<140]), dataStart: 16, data: data))
        guard case .error(_, let refused)? = handler.handleNow(early, context: Self.context(1)) else {
            Issue.record("a PUT starting past the cached prefix was accepted")
            return
        }
        #expect(refused.error == .invalidArgument)
    }

    @Test func aPutWithNoRoomLeftWaitsForEvictionAndTheEvictorKeepsHeadroom() async throws {
        let disk = try DiskTier(storage: SimulatedStorage(seed: 4), logger: Store.logger)
        let pageBytes = 16 * Store.model.bytesPerToken
        let store = try Store.store(ramBudget: 2 * pageBytes, disk: disk)
        let handler = Self.handler(store)
        let sequence = Array(Store.tokens[0..<48])
        let put = Request.put(Put(modelID: Self.modelID, tokens: sequence, dataStart: 0, data: .inline(Self.inlineData(from: 0, to: 48))))
        #expect(handler.handleNow(put, context: Self.context(1)) == nil, "3 pages over a 2-page budget need eviction")
        #expect(await handler.handleToEnd(put, context: Self.context(1)) == .put(PutReply(cachedTokens: 48, newPages: 3)))
        await store.evictionSettled()
        let status = Dictionary(uniqueKeysWithValues: store.status().map { ($0.name, $0.value) })
        #expect(status["ram_bytes"]! <= UInt64(2 * pageBytes) && status["evictions"]! >= 1)
        #expect(status["puts_waited"] == 1 && status["evicting"] == 0)
        let get = Request.get(Get(modelID: Self.modelID, tokens: sequence, inline: true))
        #expect(await handler.handleToEnd(get, context: Self.context(2)) == .get(GetReply(tokens: 48, leaseID: 0, data: .inline(Self.inlineData(from: 0, to: 48)))))
    }

    /// Puts that fit go straight to RAM; the background evictor then writes the coldest pages to
    /// disk until the headroom below the budget is free, so the next put fits without waiting.
    @Test func theBackgroundEvictorMakesRoomAheadOfPuts() async throws {
        let disk = try DiskTier(storage: SimulatedStorage(seed: 5), logger: Store.logger)
        let pageBytes = Self.extentBytes(16 * Store.model.bytesPerToken)
        var configuration = TieredStore.Configuration()
        configuration.ramBudgetBytes = 8 * pageBytes
        configuration.tenantRAMQuotaBytes = 8 * pageBytes
        configuration.evictionHeadroomBytes = 4 * pageBytes
        configuration.minResidenceMicros = 0
        let store = try Store.store(configuration: configuration, disk: disk)
        let handler = Self.handler(store)
        var waited: UInt64 = 0
        for round in 0..<6 {
            // Two pages per put, a new prefix each time.
            let sequence = Array(Store.tokens[round * 32..<round * 32 + 32])
            let data = Store.chunks(from: 0, to: 32).flatMap { chunk -> [UInt8] in
                guard case .bytes(let buffer) = chunk else { return [] }
                return buffer.copyBytes()
            }
            let put = Request.put(Put(modelID: Self.modelID, tokens: sequence, dataStart: 0, data: .inline(data)))
            #expect(await handler.handleToEnd(put, context: Self.context(1)) == .put(PutReply(cachedTokens: 32, newPages: 2)))
            await store.evictionSettled()
            let status = Dictionary(uniqueKeysWithValues: store.status().map { ($0.name, $0.value) })
            #expect(status["ram_bytes"]! <= UInt64(8 * pageBytes))
            waited = status["puts_waited"]!
        }
        #expect(waited == 0, "the evictor kept room ahead of every put")
        let status = Dictionary(uniqueKeysWithValues: store.status().map { ($0.name, $0.value) })
        #expect(status["evictions"]! >= 4 && status["ram_bytes"]! <= UInt64(4 * pageBytes), "evicted down to the headroom")
    }

    static func extentBytes(_ bytes: Int) -> Int { (bytes + 4095) / 4096 * 4096 }
}
