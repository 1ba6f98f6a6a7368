import Foundation
import KVTierCore
@testable import KVTierStore
import Testing

/// A put's copy into the page arena, split between threads by bytes whatever the page
/// boundaries: every byte of every page lands where it belongs, and nothing past a page's
/// length is written.
@Suite struct PutCopyTests {
    /// Every split is tested whatever this host's core count (the copy picks its own from it).
    @Test(arguments: [1, 2, 7, 64], [1, 2, 3, 4])
    func splitCopiesLandEveryByteInItsPage(pages: Int, threads: Int) {
        let seed = ProcessInfo.processInfo.environment["KVTIER_TEST_SEED"].flatMap { UInt64($0) } ?? UInt64.random(in: 0...UInt64.max)
        print("PutCopyTests.splitCopiesLandEveryByteInItsPage(pages: \(pages), threads: \(threads)): seed \(seed) (replay: KVTIER_TEST_SEED=\(seed))")
        var random = SplitMix64(seed: seed)
        // Over `parallelCopyBytes` in all, so the copy is split; odd lengths, so splits fall
        // inside pages.
        let total = TieredStore.parallelCopyBytes + 12_345
        var copies: [(destination: PageBuffer, source: PageBuffer, bytes: Int)] = []
        var left = total
        for index in 0..<pages {
            let bytes = index == pages - 1 ? left : Int(random.next() % UInt64(2 * total / pages)) % left + 1
            left -= bytes
            let source = PageBuffer(byteCount: bytes + 64), destination = PageBuffer(byteCount: bytes + 64)
            for i in 0..<source.count { source.bytes[i] = UInt8(truncatingIfNeeded: random.next()) }
            for i in 0..<destination.count { destination.bytes[i] = 0xEE }
            copies.append((destination, source, bytes))
            if left == 0 { break }
        }
        #expect(copies.reduce(0) { $0 + $1.bytes } == total)
        TieredStore.copy(copies, threads: threads)
        for (index, copy) in copies.enumerated() {
            #expect(Array(copy.destination.readOnly[0..<copy.bytes]) == Array(copy.source.readOnly[0..<copy.bytes]), "page \(index), seed \(seed)")
            #expect(copy.destination.readOnly[copy.bytes..<copy.destination.count].allSatisfy { $0 == 0xEE }, "past page \(index), seed \(seed)")
        }
    }
}
