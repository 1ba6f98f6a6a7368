import KVTierCodec
import KVTierCore
import KVTierStore
import KVTierTools
import Testing

/// A deletion must survive compaction and restarts even when an older record of the same page is
/// still on disk in a segment that compaction has not reached.
@Suite struct DeletionDurabilityTests {
    static func configuration() -> DiskTierConfiguration {
        var configuration = DiskTierConfiguration()
        configuration.segmentBytes = 64 << 10
        configuration.compactionLiveFraction = 0.5
        return configuration
    }

    /// Page P is written (v1, segment A), overwritten (v2, segment B), then deleted (tombstone
    /// naming v2's sequence, segment C). A stays mostly live so it is never compacted; B and C go
    /// sparse and are compacted, B first. Once B is gone, the tombstone in C names a record that
    /// exists nowhere else, so compaction drops it — but v1 is still in A, and after a restart
    /// nothing deletes it: P comes back, with its old contents.
    @Test func anOverwrittenThenDeletedPageStaysDeletedAfterCompactionAndRestart() async throws {
        let directory = try TemporaryDirectory("kvtier-deletion")
        var keep = false
        defer { if keep { print("DeletionDurabilityTests: kept \(directory.path) for inspection (kvtier pages DIR)") } else { directory.remove() } }
        let codec = Codec(.fp16, .zstd(level: 1))
        var (tier, reader) = try openTier(root: directory.path, choice: .pread, configuration: Self.configuration())
        defer { reader.close() }

        // Small versions of P (one block or two), so A stays well above the compaction threshold.
        let small = (UInt64(100_000)...).lazy.map(CrashTestPage.init(number:)).filter { $0.shape.rawBytes <= 8 << 10 }
        let versions = Array(small.prefix(2))
        let p = PageAddress(tenant: TenantID(77), key: PageKey(high: 77, low: 77))
        var nextFiller: UInt64 = 0
        /// Writes fillers until the active segment changes; returns them.
        func fillSegment(after address: PageAddress) async throws -> [CrashTestPage] {
            let segment = try #require(tier.page(address)?.segment)
            var fillers: [CrashTestPage] = []
            while true {
                let filler = CrashTestPage(number: nextFiller)
                nextFiller += 1
                let stored = try await tier.write(filler)
                if stored.segment != segment { return fillers }  // this one opened the next segment
                fillers.append(filler)
            }
        }

        try await tier.write(p, modelID: 1, codec: codec, shape: versions[0].shape, data: versions[0].data)
        let segmentA = try #require(tier.page(p)?.segment)
        let fillersA = try await fillSegment(after: p)
        try await tier.write(p, modelID: 1, codec: codec, shape: versions[1].shape, data: versions[1].data)
        let segmentB = try #require(tier.page(p)?.segment)
        let fillersB = try await fillSegment(after: p)
        #expect(try await tier.delete(p))
        // The tombstone went into segment C (opened by the last filler of B); fill C so it seals.
        let newest = try #require(tier.pages().max { $0.sequence < $1.sequence }?.address)
        let fillersC = try await fillSegment(after: newest)
        #expect(segmentA != segmentB && !fillersA.isEmpty && !fillersB.isEmpty && !fillersC.isEmpty)

        // B goes sparse first and is compacted; then C.
        for filler in fillersB { _ = try await tier.delete(filler.address) }
        for filler in fillersC { _ = try await tier.delete(filler.address) }
        #expect(!tier.contains(p))
        // close() flushes and runs the pending maintenance (threshold compaction only: A, mostly
        // live, is left alone, as it would be in a long-running daemon).
        await tier.close()
        let compactions = tier.stats.compactions
        #expect(compactions >= 2, "B and C should have been compacted: \(tier.stats)")
        reader.close()
        (tier, reader) = try openTier(root: directory.path, choice: .pread, configuration: Self.configuration())
        // DELETED PAGE BACK: a deletion that was acknowledged must survive a restart.
        if tier.contains(p) {
            let result = await tier.read(p)
            let version: String
            switch result {
            case .success(let got):
                version = PageCheck(result, expected: versions[0]) == .exact ? "its first (overwritten) version"
                    : PageCheck(result, expected: versions[1]) == .exact ? "its second version" : "unknown bytes (\(got.page.shape))"
            case .failure(let miss): version = "a miss (\(miss))"
            }
            keep = true
            // Regression guard: a tombstone deletes its page's named record and every older one,
            // and compaction keeps it while any older record of the page survives elsewhere.
            Issue.record("""
                DELETED PAGE BACK after compaction + restart: page \(p) was overwritten, then deleted \
                (acknowledged), yet after \(compactions) compactions and a restart it is listed again and reads as \
                \(version). Segment \(segmentA) still holds the first version; the tombstone was dropped by compaction. \
                Recovery: \(tier.recovery)
                """)
        }
        for filler in fillersA {
            #expect(PageCheck(await tier.read(filler.address), expected: filler) == .exact, "filler \(filler.number) of A")
        }
        await tier.close()
    }
}
