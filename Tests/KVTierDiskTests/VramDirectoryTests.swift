import Foundation
import KVTierCore
import KVTierDaemon
import KVTierProtocol
import KVTierServer
import KVTierStore
import Synchronization
import Testing

/// The VRAM tier's directory through the daemon's request handler over a real store
/// (docs/protocol.md, "VRAM tier"): pools, placements and commits, LOOKUP's `vramTokens`,
/// leases, eviction by heat, RELEASE, connections closing, and tenants kept apart.
@Suite struct VramDirectoryTests {
    typealias Store = TieredStoreTests
    static let modelID = Store.model.id
    /// One page of the test model: 16 tokens × 512 bytes.
    static let pageBytes = UInt64(Store.model.pageTokens * Store.model.bytesPerToken)
    static let handle: [UInt8] = Array("{\"ipc\": \"opaque\"}".utf8)

    static func context(_ connection: UInt64, tenant: TenantID = Store.alice) -> ConnectionContext {
        StoreRequestPathTests.context(connection, tenant: tenant)
    }

    /// A sequence of `count` tokens no other test sequence shares.
    static func sequence(_ base: UInt32, _ count: Int) -> [UInt32] { (0..<UInt32(count)).map { base + $0 } }

    /// A handler over a fresh store (and `vram`, when given), with `sequences` stored for `tenant`.
    static func handler(storing sequences: [[UInt32]] = [], tenant: TenantID = Store.alice,
                        vram: VramDirectory? = nil) async throws -> (StoreRequestHandler, TieredStore) {
        let store = try Store.store()
        for tokens in sequences { try await put(store, tokens, tenant: tenant) }
        return (StoreRequestHandler(store: store, defaultPageTokens: Store.model.pageTokens, vram: vram), store)
    }

    static func put(_ store: TieredStore, _ tokens: [UInt32], from dataStart: Int = 0, tenant: TenantID = Store.alice) async throws {
        _ = try await store.put(tenant, owner: 1, modelID: modelID, tokens: tokens, dataStart: dataStart,
                                chunks: Store.chunks(from: dataStart, to: tokens.count), durable: false)
    }
}

/// Requests answered at once (every VRAM request is), as typed replies.
extension StoreRequestHandler {
    func now(_ request: Request, _ context: ConnectionContext, sourceLocation: SourceLocation = #_sourceLocation) throws -> Reply {
        try #require(handleNow(request, context: context), "\(request.opcode) was not answered at once", sourceLocation: sourceLocation)
    }

    func registerPool(_ context: ConnectionContext, slots: UInt32, slotBytes: UInt64 = VramDirectoryTests.pageBytes,
                      sourceLocation: SourceLocation = #_sourceLocation) throws -> UInt32 {
        let request = Request.vramPool(VramPool(deviceUUID: "GPU-test", slots: slots, slotBytes: slotBytes, handle: VramDirectoryTests.handle))
        guard case .vramPool(let reply) = try now(request, context, sourceLocation: sourceLocation) else {
            throw VramTestFailure("VRAM_POOL failed")
        }
        #expect(reply.poolID != 0, sourceLocation: sourceLocation)
        return reply.poolID
    }

    func lookup(_ tokens: [UInt32], _ context: ConnectionContext, sourceLocation: SourceLocation = #_sourceLocation) throws -> LookupReply {
        guard case .lookup(let reply) = try now(.lookup(Lookup(modelID: VramDirectoryTests.modelID, tokens: tokens)), context,
                                                sourceLocation: sourceLocation) else {
            throw VramTestFailure("LOOKUP failed")
        }
        #expect(reply.vramTokens <= reply.cachedTokens, sourceLocation: sourceLocation)
        return reply
    }

    func place(_ pool: UInt32, _ tokens: [UInt32], _ context: ConnectionContext,
               sourceLocation: SourceLocation = #_sourceLocation) throws -> VramPlaceReply {
        let reply = try now(.vramPlace(VramPlace(modelID: VramDirectoryTests.modelID, poolID: pool, tokens: tokens)), context,
                            sourceLocation: sourceLocation)
        guard case .vramPlace(let placed) = reply else { throw VramTestFailure("VRAM_PLACE answered \(reply)") }
        #expect((placed.leaseID == 0) == placed.pages.isEmpty, sourceLocation: sourceLocation)
        return placed
    }

    func commit(_ lease: UInt64, _ context: ConnectionContext) throws -> Reply {
        try now(.vramCommit(VramCommit(leaseID: lease)), context)
    }

    /// PLACE then COMMIT; the reservation.
    func placeAndCommit(_ pool: UInt32, _ tokens: [UInt32], _ context: ConnectionContext,
                        sourceLocation: SourceLocation = #_sourceLocation) throws -> VramPlaceReply {
        let placed = try place(pool, tokens, context, sourceLocation: sourceLocation)
        if placed.leaseID != 0 { #expect(try commit(placed.leaseID, context) == .vramCommit, sourceLocation: sourceLocation) }
        return placed
    }

    func vramLease(_ tokens: [UInt32], _ context: ConnectionContext, sourceLocation: SourceLocation = #_sourceLocation) throws -> VramLeaseReply {
        let reply = try now(.vramLease(VramLease(modelID: VramDirectoryTests.modelID, tokens: tokens)), context, sourceLocation: sourceLocation)
        guard case .vramLease(let lent) = reply else { throw VramTestFailure("VRAM_LEASE answered \(reply)") }
        return lent
    }

    func release(_ lease: UInt64, _ context: ConnectionContext) throws -> Reply {
        try now(.release(Release(leaseID: lease)), context)
    }

    func status(_ context: ConnectionContext) throws -> [String: UInt64] {
        guard case .status(let reply) = try now(.status, context) else { throw VramTestFailure("STATUS failed") }
        return Dictionary(reply.counters.map { ($0.name, $0.value) }, uniquingKeysWith: { _, last in last })
    }
}

struct VramTestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// The wire error of an error reply, nil for anything else.
func wireError(_ reply: Reply) -> WireError? {
    if case .error(_, let error) = reply { return error.error }
    return nil
}

extension VramDirectoryTests {
    @Test func aPlacedPrefixIsInvisibleUntilCommittedThenLeasedInPageOrder() async throws {
        let tokens = Self.sequence(10_000, 48)  // three whole pages
        let (handler, _) = try await Self.handler(storing: [tokens])
        let owner = Self.context(1), writer = Self.context(2), reader = Self.context(3)
        let pool = try handler.registerPool(owner, slots: 4)

        var found = try handler.lookup(tokens, writer)
        #expect(found.cachedTokens == 48 && found.vramTokens == 0)
        #expect(found.ramTokens + found.diskTokens == found.cachedTokens)

        let placed = try handler.place(pool, tokens, writer)
        #expect(placed.leaseID >= 1 << 62 && placed.residentTokens == 0)
        #expect(placed.pages.map(\.pageIndex) == [0, 1, 2] && placed.pages.map(\.tokens) == [16, 16, 16])
        #expect(Set(placed.pages.map(\.slot)).count == 3 && placed.pages.allSatisfy { $0.slot < 4 })
        #expect(try handler.lookup(tokens, writer).vramTokens == 0, "writing slots are invisible")
        #expect(try handler.vramLease(tokens, reader) == .none, "and not lent")
        #expect(try handler.place(pool, tokens, reader).leaseID == 0, "pages being written are not reserved twice")

        #expect(wireError(try handler.commit(placed.leaseID, reader)) == .notFound, "another connection's placement")
        #expect(try handler.commit(placed.leaseID, writer) == .vramCommit)
        #expect(wireError(try handler.commit(placed.leaseID, writer)) == .notFound, "committed once")

        found = try handler.lookup(tokens, reader)
        #expect(found.cachedTokens == 48 && found.vramTokens == 48)
        #expect(try handler.lookup(Self.sequence(10_000, 60), reader).vramTokens == 48, "a longer query: the cached prefix")
        #expect(try handler.lookup(Self.sequence(10_000, 20), reader).vramTokens == 16, "a shorter one: its whole pages")

        let lent = try handler.vramLease(tokens, reader)
        #expect(lent.poolID == pool && lent.deviceUUID == "GPU-test" && lent.slots == 4 && lent.slotBytes == Self.pageBytes)
        #expect(lent.handle == Self.handle)
        #expect(lent.tokens == 48 && lent.leaseID >= 1 << 62 && lent.leaseID != placed.leaseID)
        #expect(lent.pages == placed.pages.map { VramLeasedPage(tokens: $0.tokens, slot: $0.slot) }, "the placed slots, in page order")

        let again = try handler.place(pool, tokens, writer)
        #expect(again == VramPlaceReply(leaseID: 0, residentTokens: 48, pages: []), "nothing left to place")

        var status = try handler.status(reader)
        #expect(status["vram_pools"] == 1 && status["vram_slots"] == 4 && status["vram_resident_slots"] == 3)
        #expect(status["vram_leases"] == 1 && status["vram_lease_hits"] == 1 && status["vram_commits"] == 1)
        #expect(status["leases"] == 0, "VRAM leases are the directory's, not the store's")
        #expect(try handler.release(lent.leaseID, writer) == .release, "any connection of the tenant may release")
        #expect(wireError(try handler.release(lent.leaseID, reader)) == .notFound)
        status = try handler.status(reader)
        #expect(status["vram_leases"] == 0)
    }

    @Test func aPartialLastPageIsPlacedAtItsLengthAndAPageThatGrewIsPlacedAgain() async throws {
        let tokens = Self.sequence(20_000, 48)
        let (handler, store) = try await Self.handler(storing: [Array(tokens[0..<40])])  // 16 + 16 + 8
        let c = Self.context(1)
        let pool = try handler.registerPool(c, slots: 8)
        let placed = try handler.placeAndCommit(pool, tokens, c)
        #expect(placed.pages.map(\.tokens) == [16, 16, 8] && placed.pages.map(\.pageIndex) == [0, 1, 2])
        #expect(try handler.lookup(Array(tokens[0..<40]), c).vramTokens == 40)
        #expect(try handler.lookup(tokens, c).vramTokens == 40, "the query runs on, the cached prefix does not")
        let lent = try handler.vramLease(tokens, c)
        #expect(lent.tokens == 40 && lent.pages.map(\.tokens) == [16, 16, 8])
        #expect(try handler.release(lent.leaseID, c) == .release)

        // The put completes the third page: it is another page, which the pool lacks.
        try await Self.put(store, tokens, from: 32)
        let found = try handler.lookup(tokens, c)
        #expect(found.cachedTokens == 48 && found.vramTokens == 32)
        let more = try handler.placeAndCommit(pool, tokens, c)
        #expect(more.residentTokens == 32 && more.pages.map(\.pageIndex) == [2] && more.pages.map(\.tokens) == [16])
        #expect(try handler.lookup(tokens, c).vramTokens == 48)
    }

    @Test func aFullPoolEvictsTheColdestUnleasedSlotAndNeverALeasedOne() async throws {
        let hot = Self.sequence(1_000, 16), cold = Self.sequence(2_000, 16), new = Self.sequence(3_000, 32), other = Self.sequence(4_000, 16)
        let (handler, _) = try await Self.handler(storing: [hot, cold, new, other])
        let c = Self.context(1)
        let pool = try handler.registerPool(c, slots: 3)
        #expect(try handler.place(pool, Self.sequence(9_000, 16), c).leaseID == 0, "only pages the store holds are placed")
        _ = try handler.placeAndCommit(pool, hot, c)
        _ = try handler.placeAndCommit(pool, cold, c)
        for _ in 0..<3 {
            let lent = try handler.vramLease(hot, c)
            #expect(lent.tokens == 16)
            #expect(try handler.release(lent.leaseID, c) == .release)
        }
        // Two pages: the free slot, then the cold page's.
        let placed = try handler.placeAndCommit(pool, new, c)
        #expect(placed.pages.count == 2)
        #expect(try handler.lookup(hot, c).vramTokens == 16)
        #expect(try handler.lookup(cold, c).vramTokens == 0)
        #expect(try handler.lookup(new, c).vramTokens == 32)
        #expect(try handler.status(c)["vram_evictions"] == 1)

        // With `new` leased, the only slot that may go is the hot one, however hot.
        let held = try handler.vramLease(new, c)
        #expect(held.tokens == 32)
        let coldAgain = try handler.placeAndCommit(pool, cold, c)
        #expect(coldAgain.pages.count == 1)
        #expect(try handler.lookup(hot, c).vramTokens == 0 && handler.lookup(new, c).vramTokens == 32)
        // Everything leased or being written: no room, nothing reserved, nothing lost.
        let coldHeld = try handler.vramLease(cold, c)
        let none = try handler.place(pool, other, c)
        #expect(none.leaseID == 0 && none.pages.isEmpty && none.residentTokens == 0)
        #expect(try handler.lookup(new, c).vramTokens == 32 && handler.lookup(cold, c).vramTokens == 16)
        #expect(try handler.release(coldHeld.leaseID, c) == .release)
        let one = try handler.placeAndCommit(pool, other, c)
        #expect(one.pages.map(\.pageIndex) == [0], "the released cold page made room")
        #expect(try handler.lookup(cold, c).vramTokens == 0 && handler.lookup(new, c).vramTokens == 32)
        #expect(try handler.release(held.leaseID, c) == .release)
    }

    @Test func whenRoomRunsOutTheLeadingPagesAreReserved() async throws {
        let long = Self.sequence(5_000, 64), short = Self.sequence(6_000, 16)
        let (handler, _) = try await Self.handler(storing: [long, short])
        let c = Self.context(1)
        let pool = try handler.registerPool(c, slots: 3)
        _ = try handler.placeAndCommit(pool, short, c)
        let held = try handler.vramLease(short, c)
        let placed = try handler.place(pool, long, c)
        #expect(placed.pages.map(\.pageIndex) == [0, 1], "two of four pages fit")
        // A page being written is neither evicted nor reserved again; the rest find no room.
        let again = try handler.place(pool, long, Self.context(2))
        #expect(again.leaseID == 0 && again.residentTokens == 0)
        #expect(try handler.commit(placed.leaseID, c) == .vramCommit)
        #expect(try handler.lookup(long, c).vramTokens == 32)
        let rest = try handler.place(pool, long, c)
        #expect(rest.leaseID == 0 && rest.residentTokens == 32, "the short page is leased and the long one's are its own")
        #expect(try handler.release(held.leaseID, c) == .release)
        let last = try handler.placeAndCommit(pool, long, c)
        #expect(last.residentTokens == 32 && last.pages.map(\.pageIndex) == [2])
        #expect(try handler.lookup(long, c).vramTokens == 48)
    }

    @Test func heatHalvesEveryHalfLife() async throws {
        let clock = Mutex<UInt64>(1_000_000)
        let halfLife: UInt64 = 1_000_000
        let directory = VramDirectory(heatHalfLifeMicros: halfLife, now: { clock.withLock { $0 } })
        let a = Self.sequence(7_000, 16), b = Self.sequence(7_100, 16), d = Self.sequence(7_200, 16)
        let (handler, _) = try await Self.handler(storing: [a, b, d], vram: directory)
        let c = Self.context(1)
        let pool = try handler.registerPool(c, slots: 2)
        _ = try handler.placeAndCommit(pool, a, c)
        _ = try handler.placeAndCommit(pool, b, c)
        for _ in 0..<4 { #expect(try handler.release(handler.vramLease(a, c).leaseID, c) == .release) }
        // Ten half-lives later a's five uses are worth 5/1024; one use of b now outweighs them.
        clock.withLock { $0 += 10 * halfLife }
        #expect(try handler.release(handler.vramLease(b, c).leaseID, c) == .release)
        _ = try handler.placeAndCommit(pool, d, c)
        #expect(try handler.lookup(a, c).vramTokens == 0 && handler.lookup(b, c).vramTokens == 16)
        #expect(try handler.lookup(d, c).vramTokens == 16)
        // Ten more: b's uses and d's commit have faded alike; two uses of d now keep it.
        clock.withLock { $0 += 10 * halfLife }
        for _ in 0..<2 { #expect(try handler.release(handler.vramLease(d, c).leaseID, c) == .release) }
        _ = try handler.placeAndCommit(pool, a, c)
        #expect(try handler.lookup(b, c).vramTokens == 0 && handler.lookup(d, c).vramTokens == 16)
        #expect(try handler.lookup(a, c).vramTokens == 16)
    }

    @Test func releasingAPlacementFreesItsSlotsUnwritten() async throws {
        let tokens = Self.sequence(8_000, 16)
        let (handler, _) = try await Self.handler(storing: [tokens])
        let c = Self.context(1)
        let pool = try handler.registerPool(c, slots: 1)
        let placed = try handler.place(pool, tokens, c)
        #expect(placed.pages.map(\.slot) == [0])
        #expect(try handler.status(c)["vram_writing_slots"] == 1)
        #expect(try handler.release(placed.leaseID, c) == .release)
        #expect(try handler.lookup(tokens, c).vramTokens == 0)
        #expect(wireError(try handler.commit(placed.leaseID, c)) == .notFound, "a released placement cannot be committed")
        #expect(try handler.status(c)["vram_writing_slots"] == 0)
        let again = try handler.placeAndCommit(pool, tokens, c)
        #expect(again.pages.map(\.slot) == [0], "the slot is free again")
        #expect(try handler.lookup(tokens, c).vramTokens == 16)
    }

    @Test func closingTheOwnersConnectionDropsItsPoolAndEveryLeaseOnIt() async throws {
        let tokens = Self.sequence(11_000, 48), second = Self.sequence(12_000, 16)
        let (handler, _) = try await Self.handler(storing: [tokens, second])
        let owner = Self.context(1), writer = Self.context(2), reader = Self.context(3)
        let pool = try handler.registerPool(owner, slots: 4)
        let otherPool = try handler.registerPool(reader, slots: 2)
        _ = try handler.placeAndCommit(pool, tokens, writer)
        let held = try handler.vramLease(tokens, reader)
        #expect(held.poolID == pool && held.tokens == 48)
        let pending = try handler.place(otherPool, second, writer)
        #expect(pending.pages.count == 1)

        await handler.connectionClosed(owner)
        #expect(try handler.lookup(tokens, writer).vramTokens == 0, "the owner's pool is gone for every connection")
        #expect(try handler.vramLease(tokens, reader) == .none)
        #expect(wireError(try handler.release(held.leaseID, reader)) == .notFound, "the lease went with the pool")
        #expect(wireError(try handler.now(.vramPlace(VramPlace(modelID: Self.modelID, poolID: pool, tokens: tokens)), writer)) == .notFound)

        // The writer's placement on the reader's pool ends with the writer's connection.
        await handler.connectionClosed(writer)
        #expect(wireError(try handler.commit(pending.leaseID, writer)) == .notFound)
        let retry = try handler.placeAndCommit(otherPool, second, reader)
        #expect(retry.pages.count == 1)
        var status = try handler.status(reader)
        #expect(status["vram_pools"] == 1 && status["vram_leases"] == 0 && status["vram_writing_slots"] == 0)
        await handler.connectionClosed(reader)
        status = try handler.status(reader)
        #expect(status["vram_pools"] == 0 && status["vram_slots"] == 0 && status["vram_resident_slots"] == 0)
        let next = try handler.registerPool(Self.context(4), slots: 1)
        #expect(next > otherPool, "pool ids are never reused")
    }

    @Test func anotherTenantSeesNoneOfAPoolsSlotsLeasesOrId() async throws {
        let tokens = Self.sequence(13_000, 32)
        let (handler, store) = try await Self.handler(storing: [tokens])
        try await Self.put(store, tokens, tenant: Store.bob)
        let alice = Self.context(1), bob = Self.context(2, tenant: Store.bob)
        let pool = try handler.registerPool(alice, slots: 4)
        let placed = try handler.place(pool, tokens, alice)
        #expect(wireError(try handler.commit(placed.leaseID, bob)) == .notFound)
        #expect(try handler.commit(placed.leaseID, alice) == .vramCommit)
        #expect(try handler.lookup(tokens, alice).vramTokens == 32)

        let found = try handler.lookup(tokens, bob)
        #expect(found.cachedTokens == 32 && found.vramTokens == 0, "bob has the same tokens cached, not alice's pool")
        #expect(try handler.vramLease(tokens, bob) == .none)
        let refused = try handler.now(.vramPlace(VramPlace(modelID: Self.modelID, poolID: pool, tokens: tokens)), bob)
        #expect(wireError(refused) == .notFound)
        let lent = try handler.vramLease(tokens, alice)
        #expect(wireError(try handler.release(lent.leaseID, bob)) == .notFound)
        #expect(try handler.release(lent.leaseID, alice) == .release)
    }

    @Test func poolsAreBoundedAndSizedForTheModel() async throws {
        let tokens = Self.sequence(14_000, 16)
        let (handler, _) = try await Self.handler(storing: [tokens])
        let c = Self.context(1)
        let small = try handler.registerPool(c, slots: 1, slotBytes: Self.pageBytes - 1)
        for _ in 0..<3 { _ = try handler.registerPool(Self.context(2), slots: 1) }
        let fifth = Request.vramPool(VramPool(deviceUUID: "GPU-test", slots: 1, slotBytes: 1, handle: [1]))
        #expect(wireError(try handler.now(fifth, Self.context(3))) == .overBudget, "four pools per tenant")
        #expect(try handler.registerPool(Self.context(4, tenant: Store.bob), slots: 1) != 0, "another tenant's count is its own")
        #expect(wireError(try handler.now(.vramPlace(VramPlace(modelID: Self.modelID, poolID: small, tokens: tokens)), c)) == .invalidArgument)
        #expect(wireError(try handler.now(.vramPlace(VramPlace(modelID: Self.modelID, poolID: 987_654, tokens: tokens)), c)) == .notFound)
        #expect(wireError(try handler.now(.vramPlace(VramPlace(modelID: 0xDEAD, poolID: small, tokens: tokens)), c)) == .notFound)
        #expect(wireError(try handler.now(.vramLease(VramLease(modelID: 0xDEAD, tokens: tokens)), c)) == .notFound)
        #expect(wireError(try handler.commit(12_345, c)) == .notFound)
        await handler.connectionClosed(c)
        #expect(try handler.registerPool(Self.context(3), slots: 1) > small, "a closed pool's place is free")
    }

    @Test func directoryLeasesAreBoundedPerConnection() async throws {
        var limits = VramDirectory.Limits()
        limits.maxLeasesPerConnection = 2
        let tokens = Self.sequence(15_000, 16)
        let (handler, _) = try await Self.handler(storing: [tokens], vram: VramDirectory(heatHalfLifeMicros: 60_000_000, limits: limits))
        let c = Self.context(1)
        let pool = try handler.registerPool(c, slots: 1)
        _ = try handler.placeAndCommit(pool, tokens, c)
        let first = try handler.vramLease(tokens, c), second = try handler.vramLease(tokens, c)
        #expect(first.tokens == 16 && second.tokens == 16)
        let third = try handler.now(.vramLease(VramLease(modelID: Self.modelID, tokens: tokens)), c)
        guard case .error(_, let error) = third else { Issue.record("a third lease was granted: \(third)"); return }
        #expect(error.error == .overBudget && error.message.contains("maxLeasesPerConnection"))
        #expect(try handler.vramLease(tokens, Self.context(2)).tokens == 16, "another connection has its own count")
        #expect(try handler.release(first.leaseID, c) == .release)
        #expect(try handler.vramLease(tokens, c).tokens == 16)
    }

    /// Connections of two tenants placing, committing, leasing, releasing and closing at once,
    /// from a seeded generator: every reply is one the protocol allows, and once every
    /// connection has closed the directory holds nothing.
    @Test func concurrentConnectionsLeaveTheDirectoryConsistent() async throws {
        let seed = ProcessInfo.processInfo.environment["KVTIER_TEST_SEED"].flatMap { UInt64($0) } ?? UInt64.random(in: 0...UInt64.max)
        print("VramDirectoryTests.concurrentConnectionsLeaveTheDirectoryConsistent: seed \(seed) (replay: KVTIER_TEST_SEED=\(seed))")
        let prefixes = (0..<6).map { Self.sequence(30_000 + UInt32($0) * 100, 16 * ($0 % 3 + 1) + ($0 % 2) * 5) }
        let (handler, store) = try await Self.handler(storing: prefixes)
        for tokens in prefixes { try await Self.put(store, tokens, tenant: Store.bob) }
        await withTaskGroup(of: Void.self) { group in
            for worker in 0..<8 {
                group.addTask {
                    var random = SplitMix64(seed: seed &+ UInt64(worker))
                    let tenant = worker % 2 == 0 ? Store.alice : Store.bob
                    let context = Self.context(100 + UInt64(worker), tenant: tenant)
                    var pools: [UInt32] = [], leases: [UInt64] = []
                    for _ in 0..<200 {
                        let tokens = prefixes[Int(random.next() % UInt64(prefixes.count))]
                        switch random.next() % 6 {
                        case 0 where pools.count < 2:
                            if case .vramPool(let r)? = handler.handleNow(.vramPool(VramPool(deviceUUID: "GPU-\(worker)", slots: UInt32(random.next() % 6 + 1),
                                                                                             slotBytes: Self.pageBytes, handle: [UInt8(worker)])), context: context) {
                                pools.append(r.poolID)
                            }
                        case 1, 2:
                            guard let pool = pools.randomElement(using: &random) else { continue }
                            guard case .vramPlace(let placed)? = handler.handleNow(.vramPlace(VramPlace(modelID: Self.modelID, poolID: pool, tokens: tokens)),
                                                                                   context: context) else {
                                Issue.record("PLACE on an own pool failed (seed \(seed))")
                                continue
                            }
                            if placed.leaseID != 0 {
                                if random.next() % 4 == 0 { leases.append(placed.leaseID) } else {
                                    #expect(handler.handleNow(.vramCommit(VramCommit(leaseID: placed.leaseID)), context: context) == .vramCommit)
                                }
                            }
                        case 3:
                            if case .vramLease(let lent)? = handler.handleNow(.vramLease(VramLease(modelID: Self.modelID, tokens: tokens)), context: context),
                               lent.leaseID != 0 {
                                #expect(lent.pages.reduce(0) { $0 + $1.tokens } == lent.tokens && Int(lent.tokens) <= tokens.count)
                                leases.append(lent.leaseID)
                            }
                        case 4:
                            if case .lookup(let found)? = handler.handleNow(.lookup(Lookup(modelID: Self.modelID, tokens: tokens)), context: context) {
                                #expect(found.vramTokens <= found.cachedTokens, "seed \(seed)")
                            }
                        default:
                            // Released, or gone with another connection's pool.
                            guard !leases.isEmpty else { continue }
                            let lease = leases.remove(at: Int(random.next() % UInt64(leases.count)))
                            let reply = handler.handleNow(.release(Release(leaseID: lease)), context: context)
                            #expect(reply == .release || reply.flatMap(wireError) == .notFound, "seed \(seed)")
                        }
                    }
                    await handler.connectionClosed(context)
                }
            }
        }
        let status = try handler.status(Self.context(1))
        #expect(status["vram_pools"] == 0 && status["vram_leases"] == 0 && status["vram_slots"] == 0, "seed \(seed): \(status)")
    }
}

extension VramDirectoryTests {
    /// VRAM_DROP: the pool leaves the directory at once, and the owner hears how many readers
    /// are still copying from it, so it frees the memory only after the last one released.
    @Test func aDroppedPoolIsHiddenAtOnceAndForgottenWhenItsLastReaderReleases() async throws {
        let tokens = Self.sequence(90_000, 32)  // two whole pages
        let (handler, _) = try await Self.handler(storing: [tokens])
        let owner = Self.context(1), reader = Self.context(2), other = Self.context(3)
        let pool = try handler.registerPool(owner, slots: 4)
        _ = try handler.placeAndCommit(pool, tokens, owner)
        let lent = try handler.vramLease(tokens, reader)
        #expect(lent.tokens == 32 && lent.leaseID != 0)
        let writing = try handler.place(pool, Self.sequence(90_000, 32) + [1], other)  // nothing new to write
        #expect(writing.leaseID == 0)

        #expect(wireError(try handler.now(.vramDrop(VramDrop(poolID: pool)), reader)) == .notFound, "only the owner drops")
        #expect(try handler.now(.vramDrop(VramDrop(poolID: pool)), owner) == .vramDrop(VramDropReply(readers: 1)))
        #expect(try handler.lookup(tokens, other).vramTokens == 0, "hidden from lookups")
        #expect(try handler.vramLease(tokens, other) == .none, "and from new leases")
        #expect(wireError(try handler.now(.vramPlace(VramPlace(modelID: Self.modelID, poolID: pool, tokens: tokens)), owner)) == .notFound)
        #expect(try handler.status(owner)["vram_pools"] == 1, "kept while a reader copies")
        // Dropped pools still count against the tenant's four until they are forgotten.
        for _ in 0..<3 { _ = try handler.registerPool(other, slots: 1) }
        #expect(wireError(try handler.now(.vramPool(VramPool(deviceUUID: "GPU-test", slots: 1, slotBytes: Self.pageBytes,
                                                             handle: Self.handle)), other)) == .overBudget)

        #expect(try handler.release(lent.leaseID, reader) == .release)
        #expect(try handler.now(.vramDrop(VramDrop(poolID: pool)), owner) == .vramDrop(VramDropReply(readers: 0)))
        #expect(try handler.status(owner)["vram_pools"] == 3, "forgotten")
        #expect(wireError(try handler.now(.vramDrop(VramDrop(poolID: pool)), owner)) == .notFound, "dropped once")
    }

    /// A placement in progress on a dropped pool ends unwritten: its commit is refused.
    @Test func droppingAPoolEndsItsPlacementsInProgress() async throws {
        let tokens = Self.sequence(91_000, 16)
        let (handler, _) = try await Self.handler(storing: [tokens])
        let owner = Self.context(1), writer = Self.context(2)
        let pool = try handler.registerPool(owner, slots: 2)
        let placed = try handler.place(pool, tokens, writer)
        #expect(placed.leaseID != 0)
        #expect(try handler.now(.vramDrop(VramDrop(poolID: pool)), owner) == .vramDrop(VramDropReply(readers: 0)))
        #expect(wireError(try handler.commit(placed.leaseID, writer)) == .notFound)
        #expect(try handler.status(owner)["vram_leases"] == 0 && handler.status(owner)["vram_pools"] == 0)
    }
}
