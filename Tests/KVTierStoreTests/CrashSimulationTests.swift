import KVTierCodec
import KVTierCore
import KVTierStore
import KVTierStoreTesting
import Testing

/// Power loss at random points, with random I/O errors: every page acknowledged before the crash
/// must come back bit-exact, and nothing damaged may ever be served. Seeded; a failure prints
/// the seed that replays it.
@Suite struct CrashSimulationTests {
    @Test(arguments: 0..<48)
    func acknowledgedPagesSurvivePowerLoss(round: Int) async throws {
        let seed = UInt64(0xC4A5_0000 + round)
        var random = SplitMix64(seed: seed)
        let storage = SimulatedStorage(seed: seed, faults: .init(ioErrorRate: round % 3 == 0 ? 0.02 : 0))
        var acknowledged = Set<UInt64>()
        var deleted = Set<UInt64>()
        var next: UInt64 = 0
        for _ in 0..<4 {
            let tier: DiskTier
            do { tier = try DiskTier(storage: storage, configuration: smallSegments(), logger: quietLogger) } catch {
                // An injected EIO during recovery is a failed start, not data loss: try again.
                continue
            }
            for n in acknowledged {
                #expect(await readsBack(tier, TestPage(number: n)), "seed \(seed): acknowledged page \(n) lost")
            }
            for n in deleted { #expect(!tier.contains(TestPage(number: n).address), "seed \(seed): deleted page \(n) is back") }
            let operations = 5 + Int(random.next() % 30)
            for _ in 0..<operations {
                if random.next() % 6 == 0, let victim = acknowledged.randomElement(using: &random) {
                    if (try? await tier.delete(TestPage(number: victim).address)) == true {
                        acknowledged.remove(victim)
                        deleted.insert(victim)
                    }
                } else {
                    let page = TestPage(number: next)
                    next += 1
                    if (try? await write(tier, page)) != nil { acknowledged.insert(page.number) }
                }
            }
            storage.crash()
        }
    }
}

