import KVTierCore
import KVTierStore
import KVTierStoreTesting
import Testing

/// The disk budget's session-hold lookup stays one call deep however often it is read. It was a
/// bare closure in a `Mutex`: every read re-wrapped it in a reabstraction thunk, so after a few
/// thousand group commits under a disk budget each lookup walked thousands of frames with the disk
/// tier's lock held, and a 64-client soak stalled every request after about three minutes.
@Suite struct SessionHoldsTests {
    @Test func readingTheLookupDoesNotDeepenIt() throws {
        let storage = SimulatedStorage(seed: 11)
        let (store, disk, _) = try ModelDiskCodecTests.open(storage)
        _ = store
        let address = PageAddress(tenant: TenantID(5), key: PageKey(high: 1, low: 2))
        // Each read used to add a frame to every later call: 400,000 reads made the next
        // lookup recurse 400,000 thunks deep, past the end of any thread's stack.
        var held = 0
        for _ in 0..<400_000 where disk.sessionHold(of: address) != .none { held += 1 }
        #expect(held == 0)
    }
}
