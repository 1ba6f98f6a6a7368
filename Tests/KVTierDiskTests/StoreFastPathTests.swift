import KVTierCore
import KVTierDaemon
import KVTierProtocol
import KVTierServer
import KVTierStore
import KVTierStoreTesting
import Testing

/// The daemon's synchronous path (`StoreRequestHandler.handleImmediately`) against its async
/// path (`handle`) on the same store: same replies, same bytes, and nil for everything that
/// needs the disk, a session, durability or a merge with a stored partial page.
@Suite struct StoreFastPathTests {
    typealias Store = TieredStoreTests
    static let modelID = Store.model.id

    static func context(_ connection: UInt64, tenant: TenantID = Store.alice, sharedMemory: Bool = true) -> ConnectionContext {
        ConnectionContext(connectionID: connection, tenant: tenant, peer: PeerCredentials(pid: 1, uid: tenant.rawValue, gid: 0),
                          protocolVersion: ProtocolVersion.current, clientName: "fast-path-test", sharedMemory: sharedMemory)
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
        guard case .get(let fast)? = handler.handleImmediately(request, context: Self.context(7)),
              case .get(let slow) = await handler.handle(request, context: Self.context(8)) else {
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
            #expect(handler.handleImmediately(.release(Release(leaseID: fast.leaseID)), context: Self.context(7)) == .release)
            #expect(handler.handleImmediately(.release(Release(leaseID: slow.leaseID)), context: Self.context(8)) == .release)
            guard case .error(_, let again)? = handler.handleImmediately(.release(Release(leaseID: fast.leaseID)), context: Self.context(7)) else {
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
            let fast = handler.handleImmediately(request, context: Self.context(3, tenant: tenant))
            let slow = await handler.handle(request, context: Self.context(4, tenant: tenant))
            if tenant == Store.bob {
                #expect(fast == nil, "a tenant's first request creates its memory: the async path's")
                #expect(handler.handleImmediately(request, context: Self.context(3, tenant: tenant)) == slow, "bob sees nothing of alice's")
            } else {
                #expect(fast == slow, "tenant \(tenant), maxTokens \(maxTokens)")
            }
        }
        // Another tenant can neither see nor release alice's lease.
        guard case .get(let leased)? = handler.handleImmediately(.get(Get(modelID: Self.modelID, tokens: sequence)), context: Self.context(3)) else {
            Issue.record("no lease")
            return
        }
        guard case .error(_, let refused)? = handler.handleImmediately(.release(Release(leaseID: leased.leaseID)),
                                                                       context: Self.context(5, tenant: Store.bob)) else {
            Issue.record("bob released alice's lease")
            return
        }
        #expect(refused.error == .notFound)
        #expect(handler.handleImmediately(.release(Release(leaseID: leased.leaseID)), context: Self.context(3)) == .release)
    }

    @Test func aGetThatNeedsTheDiskTakesTheAsyncPathAndComesBackExact() async throws {
        let disk = try DiskTier(storage: SimulatedStorage(seed: 3), logger: Store.logger)
        let pageBytes = 16 * Store.model.bytesPerToken
        let store = try Store.store(ramBudget: 4 * pageBytes, disk: disk)
        let handler = Self.handler(store)
        let sequence = Array(Store.tokens[0..<160])  // 10 pages, 6 or more of them evicted
        _ = try await store.put(Store.alice, owner: 1, modelID: Self.modelID, tokens: sequence, dataStart: 0,
                                chunks: Store.chunks(from: 0, to: 160), durable: false)
        #expect(try store.lookup(Store.alice, modelID: Self.modelID, tokens: sequence).diskTokens >= 96)
        let request = Request.get(Get(modelID: Self.modelID, tokens: sequence, inline: true))
        #expect(handler.handleImmediately(request, context: Self.context(2)) == nil, "promotion from disk is the async path's")
        guard case .get(let slow) = await handler.handle(request, context: Self.context(2)) else {
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
        #expect(handler.handleImmediately(put, context: Self.context(1)) == .put(PutReply(cachedTokens: 40, newPages: 3)))
        #expect(handler.handleImmediately(put, context: Self.context(1)) == .put(PutReply(cachedTokens: 40, newPages: 0)),
                "stored once")
        let get = Request.get(Get(modelID: Self.modelID, tokens: sequence, inline: true))
        let slow = await handler.handle(get, context: Self.context(2))
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
        #expect(handler.handleImmediately(first, context: Self.context(1)) != nil)
        let second = Request.put(Put(modelID: Self.modelID, tokens: long, dataStart: 32, data: .inline(Self.inlineData(from: 32, to: 48))))
        #expect(handler.handleImmediately(second, context: Self.context(1)) == nil)
        #expect(await handler.handle(second, context: Self.context(1)) == .put(PutReply(cachedTokens: 48, newPages: 1)))
        #expect(try store.lookup(Store.alice, modelID: Self.modelID, tokens: short).cachedTokens == 32, "the 8-token page is gone")
    }

    @Test func aStagedPutAdoptsTheExtentsAndEndsTheAllocLease() async throws {
        let store = try Store.store()
        let handler = Self.handler(store)
        let sequence = Array(Store.tokens[0..<32])
        let pageBytes = 16 * Store.model.bytesPerToken
        guard case .alloc(let staging)? = handler.handleImmediately(.alloc(Alloc(byteCounts: [UInt64(pageBytes), UInt64(pageBytes)])),
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
        #expect(handler.handleImmediately(put, context: Self.context(1)) == .put(PutReply(cachedTokens: 32, newPages: 2)))
        #expect(store.status().first { $0.name == "leases" }?.value == 0, "the ALLOC lease ended with its last extent")
        guard case .get(let got)? = handler.handleImmediately(.get(Get(modelID: Self.modelID, tokens: sequence)), context: Self.context(1)),
              case .extents(let served) = got.data else {
            Issue.record("GET failed")
            return
        }
        #expect(served.map(\.offset) == staging.extents.map(\.offset), "adopted, not copied")
        // Another connection may not name this connection's staging extents: the async path words it.
        #expect(handler.handleImmediately(put, context: Self.context(9)) == nil)
    }

    @Test func sessionsDurabilityAndPartialPagesTakeTheAsyncPath() async throws {
        let store = try Store.store()
        let handler = Self.handler(store)
        let sequence = Array(Store.tokens[0..<40])
        let data = PageData.inline(Self.inlineData(from: 0, to: 40))
        let session = Request.put(Put(modelID: Self.modelID, session: "chat-1", tokens: sequence, dataStart: 0, data: data))
        #expect(handler.handleImmediately(session, context: Self.context(1)) == nil, "a PUT naming a session")
        let durable = Request.put(Put(modelID: Self.modelID, durable: true, tokens: sequence, dataStart: 0, data: data))
        #expect(handler.handleImmediately(durable, context: Self.context(1)) == nil, "a durable PUT")
        #expect(store.status().first { $0.name == "puts" }?.value == 0)

        // 20 tokens: a page and a 4-token partial page, both whole from token 0: at once.
        let first = Request.put(Put(modelID: Self.modelID, tokens: Array(sequence[0..<20]), dataStart: 0,
                                    data: .inline(Self.inlineData(from: 0, to: 20))))
        #expect(handler.handleImmediately(first, context: Self.context(1)) == .put(PutReply(cachedTokens: 20, newPages: 2)))
        // Extending from token 20 completes the partial page (a merge): the async path's.
        let extend = Request.put(Put(modelID: Self.modelID, tokens: sequence, dataStart: 20, data: .inline(Self.inlineData(from: 20, to: 40))))
        #expect(handler.handleImmediately(extend, context: Self.context(1)) == nil)
        #expect(await handler.handle(extend, context: Self.context(1)) == .put(PutReply(cachedTokens: 40, newPages: 2)))
        // The completed page holds the first put's rows 16..<20, then the second's: both paths
        // serve the same bytes.
        let get = Request.get(Get(modelID: Self.modelID, tokens: sequence, inline: true))
        let fast = handler.handleImmediately(get, context: Self.context(1))
        let slow = await handler.handle(get, context: Self.context(1))
        #expect(fast != nil && fast == slow)
        // A request the async path refuses is left to it, for its wording.
        let early = Request.put(Put(modelID: Self.modelID, tokens: Array(Store.tokens[100..<140]), dataStart: 16, data: data))
        #expect(handler.handleImmediately(early, context: Self.context(1)) == nil)
        guard case .error(_, let refused) = await handler.handle(early, context: Self.context(1)) else {
            Issue.record("a PUT starting past the cached prefix was accepted")
            return
        }
        #expect(refused.error == .invalidArgument)
    }

    @Test func aPutThatWouldPassTheBudgetTakesTheAsyncPath() async throws {
        let disk = try DiskTier(storage: SimulatedStorage(seed: 4), logger: Store.logger)
        let pageBytes = 16 * Store.model.bytesPerToken
        let store = try Store.store(ramBudget: 2 * pageBytes, disk: disk)
        let handler = Self.handler(store)
        let sequence = Array(Store.tokens[0..<48])
        let put = Request.put(Put(modelID: Self.modelID, tokens: sequence, dataStart: 0, data: .inline(Self.inlineData(from: 0, to: 48))))
        #expect(handler.handleImmediately(put, context: Self.context(1)) == nil, "3 pages over a 2-page budget need eviction")
        #expect(await handler.handle(put, context: Self.context(1)) == .put(PutReply(cachedTokens: 48, newPages: 3)))
        let status = Dictionary(uniqueKeysWithValues: store.status().map { ($0.name, $0.value) })
        #expect(status["ram_bytes"]! <= UInt64(2 * pageBytes) && status["evictions"]! >= 1)
    }
}
