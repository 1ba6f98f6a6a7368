import KVTierCodec
import KVTierCore
import KVTierStore
import KVTierStoreTesting
import KVTierTools
import Testing

/// `kvtier pages` must list exactly the pages a daemon opening the same store serves: the
/// inspector and recovery read the store with one reader (`DiskImage`) and one replay rule.
@Suite struct InspectorRecoveryAgreementTests {
    static let codec = Codec(.fp16, .zstd(level: 1))

    /// A page as both sides name it: which record holds it.
    struct Listed: Hashable, CustomStringConvertible {
        var key: String
        var segment: UInt64
        var offset: Int
        var sequence: UInt64
        var description: String { "\(key)@\(segment):\(offset)#\(sequence)" }
    }

    @Test func theInspectorListsExactlyThePagesARecoveredTierServes() async throws {
        let storage = SimulatedStorage(seed: 21)
        var configuration = DiskTierConfiguration()
        configuration.segmentBytes = 64 << 10
        // Only a segment with nothing live is compacted, which writes nothing: every record
        // stays where the test put it, whenever the writer gets to it.
        configuration.compactionLiveFraction = 0.01
        let tier = try DiskTier(storage: storage, configuration: configuration, logger: diskTestLogger)
        var next = 10
        var untouched: Set<Int> = []
        func path(_ segment: UInt64) -> String { "\(DiskStoreFixture.directory)/\(SegmentHeader.fileName(segment))" }
        @discardableResult
        func put(_ n: Int) async throws -> StoredPage {
            try await tier.write(DiskStoreFixture.address(n), modelID: 1, codec: Self.codec, shape: DiskStoreFixture.shape,
                                 data: DiskStoreFixture.data(n))
        }
        /// Writes new pages until one lands in a segment after `segment`; returns their numbers.
        func fill(until segment: UInt64) async throws -> [Int] {
            var written: [Int] = []
            while true {
                let page = try await put(next)
                written.append(next)
                untouched.insert(next)
                next += 1
                if page.segment != segment { return written }
            }
        }

        // Pages 0–3 go into the first segment, to be rewritten, deleted or damaged later.
        let first = try await put(0)
        for n in 1...3 { try await put(n) }
        _ = try await fill(until: first.segment)

        // Page 0: rewritten, then deleted, and the rewrite's segment compacted away: the
        // tombstone names a sequence greater than the put still in the first segment.
        let rewritten = try await put(0)
        #expect(rewritten.segment != first.segment)
        _ = try await fill(until: rewritten.segment)
        #expect(try await tier.delete(DiskStoreFixture.address(0)))
        for n in untouched.sorted() where tier.page(DiskStoreFixture.address(n))?.segment == rewritten.segment {
            #expect(try await tier.delete(DiskStoreFixture.address(n)))
            untouched.remove(n)
        }
        // Page 1: deleted where it was written (the tombstone names its own put).
        #expect(try await tier.delete(DiskStoreFixture.address(1)))
        // Page 2: rewritten into a segment that gets sealed; that record's header is damaged later.
        let sealedRewrite = try await put(2)
        _ = try await fill(until: sealedRewrite.segment)
        // Page 3: rewritten into the active segment, followed by more records; its bytes are
        // damaged later, below the acknowledged end.
        let activeRewrite = try await put(3)
        for _ in 0..<3 {
            try await put(next)
            untouched.insert(next)
            next += 1
        }
        // The last record: cut in half later (a torn tail).
        let last = try await put(next)
        await tier.close()
        #expect(activeRewrite.segment == last.segment, "the damaged record and the torn tail are both in the active segment")

        storage.corrupt(path(sealedRewrite.segment), at: sealedRewrite.offset + 40)
        storage.corrupt(path(activeRewrite.segment), at: activeRewrite.offset + activeRewrite.recordBytes / 2, bit: 5)
        let tail = try storage.open(path(last.segment), .readWriteCreate)
        try tail.truncate(to: last.offset + last.recordBytes / 2)

        let inspection = try DiskInspector(storage: storage, directory: DiskStoreFixture.directory).inspect()
        #expect(!inspection.report.segmentDetails.contains { $0.id == rewritten.segment }, "the rewrite of page 0 was compacted away")
        #expect(inspection.report.segmentDetails.contains { $0.id == first.segment }, "the first puts of pages 0–3 are still there")
        #expect(inspection.report.segmentDetails.first { $0.id == sealedRewrite.segment }?.state == "sealed")
        #expect(inspection.report.corruptRecords == 2, "\(inspection.report.problems)")
        #expect(inspection.report.tornTailBytes > 0)

        let recovered = try DiskTier(storage: storage, configuration: configuration, logger: diskTestLogger)
        var served: Set<Listed> = []
        for page in recovered.pages() {
            guard case .success(let read) = await recovered.read(page.address) else { continue }
            let n = Int(page.address.key.low)
            #expect(read.data.copyBytes() == DiskStoreFixture.data(n).copyBytes(), "page \(n) reads back its own bytes")
            served.insert(Listed(key: page.address.key.description, segment: page.segment, offset: page.offset, sequence: page.sequence))
        }
        let listed = Set(inspection.pages.map { Listed(key: $0.key, segment: $0.segment, offset: $0.offset, sequence: $0.sequence) })
        #expect(listed == served, "listed, not served: \(listed.subtracting(served)); served, not listed: \(served.subtracting(listed))")
        #expect(listed.count == inspection.pages.count, "each page listed once")

        // Each case above is absent from both, for its own reason.
        for n in [0, 1, 2, 3, next] {
            #expect(!listed.contains { $0.key == DiskStoreFixture.address(n).key.description }, "page \(n) is not live")
        }
        #expect(Set(served.map(\.key)) == Set(untouched.map { DiskStoreFixture.address($0).key.description }),
                "every page written once and left alone is served")
        await recovered.close()
    }
}
