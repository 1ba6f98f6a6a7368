#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import KVTierCodec
import KVTierCore
import KVTierIO
import KVTierStore
import KVTierStoreTesting
import KVTierTools
import Logging
import Testing

let diskTestLogger: Logger = {
    var logger = Logger(label: "kvtier.tools.test")
    logger.logLevel = .critical
    return logger
}()

/// A store written through a real `DiskTier` on simulated storage, with what was written.
struct DiskStoreFixture {
    static let shape = PageShape(tokens: 16, layers: 2, kvHeads: 2, headDim: 32)
    static let directory = "store"

    let storage: SimulatedStorage
    var written: [StoredPage] = []

    /// Writes `pages` pages (and deletes `deleting` of them) and closes the tier. Small segments
    /// make some of them sealed.
    static func make(seed: UInt64, pages: Int, deleting: [Int] = [], segmentBytes: Int = 256 << 20) async throws -> DiskStoreFixture {
        var fixture = DiskStoreFixture(storage: SimulatedStorage(seed: seed))
        var configuration = DiskTierConfiguration()
        configuration.segmentBytes = segmentBytes
        let tier = try DiskTier(storage: fixture.storage, configuration: configuration, logger: diskTestLogger)
        for n in 0..<pages {
            fixture.written.append(try await tier.write(address(n), modelID: 0xABC, codec: Codec(.fp16, .zstd(level: 1)),
                                                        shape: shape, data: data(n)))
        }
        for n in deleting { try await tier.delete(address(n)) }
        await tier.close()
        return fixture
    }

    static func address(_ n: Int) -> PageAddress { PageAddress(tenant: TenantID(42), key: PageKey(high: 0xF00D, low: UInt64(n))) }

    static func data(_ n: Int) -> PageBuffer {
        let buffer = PageBuffer(byteCount: shape.rawBytes)
        var random = SplitMix64(seed: UInt64(n) &+ 1)
        let elements = buffer.bytes.bindMemory(to: UInt16.self)
        // Finite float16 values of moderate size, different for every page.
        for i in 0..<elements.count { elements[i] = UInt16(truncatingIfNeeded: random.next()) & 0x83FF | 0x3400 }
        return buffer
    }

    var inspector: DiskInspector { DiskInspector(storage: storage, directory: Self.directory) }

    func inspect() throws -> DiskInspection { try inspector.inspect() }

    /// Every file's bytes, to show an inspection changed nothing.
    func snapshot() throws -> [String: [UInt8]] {
        var files: [String: [UInt8]] = [:]
        for folder in [Self.directory, "\(Self.directory)/quarantine"] {
            for name in try storage.list(folder) where name != "quarantine" {
                let file = try storage.open("\(folder)/\(name)", .read)
                let buffer = PageBuffer(byteCount: max(try file.size(), 1))
                let got = try file.read(into: buffer.bytes, at: 0)
                files["\(folder)/\(name)"] = Array(buffer.readOnly[0..<got])
            }
        }
        return files
    }

    func segmentPath(_ id: UInt64) -> String { "\(Self.directory)/\(SegmentHeader.fileName(id))" }
}

@Suite struct DiskInspectorTests {
    @Test func aCleanStoreHasNoCorruptionAndListsWhatWasWritten() async throws {
        let fixture = try await DiskStoreFixture.make(seed: 1, pages: 40, deleting: [3, 17], segmentBytes: 64 << 10)
        let before = try fixture.snapshot()
        let inspection = try fixture.inspect()
        let r = inspection.report
        #expect(r.corrupt == 0)
        #expect(r.ok)
        #expect(r.problems.isEmpty, "\(r.problems)")
        #expect(r.sealedSegments >= 1, "small segments must have rotated")
        #expect(r.pages == 38)
        #expect(r.pageRecords == 40)
        #expect(r.tombstones == 2)
        #expect(r.tornTailBytes == 0)
        let expected = fixture.written.filter { ![3, 17].contains(Int($0.address.key.low)) }
            .sorted { ($0.segment, $0.offset) < ($1.segment, $1.offset) }
        #expect(inspection.pages.map(\.key) == expected.map { $0.address.key.description })
        #expect(inspection.pages.map(\.offset) == expected.map(\.offset))
        #expect(inspection.pages.map(\.sequence) == expected.map(\.sequence))
        let first = try #require(inspection.pages.first)
        #expect(first.tenant == 42)
        #expect(first.modelID == "0000000000000abc")
        #expect(first.codec == "fp16+zstd(1)" || first.codec.hasPrefix("fp16+zstd"))
        #expect(first.layers == 2 && first.tokens == 16)
        #expect(try fixture.snapshot() == before, "inspection must not modify the store")
    }

    @Test func aFlippedByteInARecordIsOneCorruptRecordNamedByOffset() async throws {
        let fixture = try await DiskStoreFixture.make(seed: 2, pages: 6)
        let victim = fixture.written[2]
        fixture.storage.corrupt(fixture.segmentPath(victim.segment), at: victim.offset + victim.recordBytes / 2, bit: 3)
        let r = try fixture.inspect().report
        #expect(r.corruptRecords == 1)
        #expect(r.corrupt == 1)
        #expect(!r.ok)
        #expect(r.pages == 5, "the damaged page is not live")
        #expect(r.tornTailBytes == 0)
        let name = SegmentHeader.fileName(victim.segment)
        #expect(r.problems.contains { $0.contains(name) && $0.contains("offset \(victim.offset)") }, "\(r.problems)")
    }

    @Test func damageInASealedSegmentIsNotCountedTwiceByItsIndex() async throws {
        let fixture = try await DiskStoreFixture.make(seed: 3, pages: 40, segmentBytes: 64 << 10)
        let victim = fixture.written[1]
        fixture.storage.corrupt(fixture.segmentPath(victim.segment), at: victim.offset + 100)
        let r = try fixture.inspect().report
        #expect(r.segmentDetails.first { $0.id == victim.segment }?.state == "sealed")
        #expect(r.corruptRecords == 1)
        #expect(r.corruptIndexBlocks == 0)
        #expect(r.corrupt == 1)
    }

    @Test func aDamagedIndexBlockIsReported() async throws {
        let fixture = try await DiskStoreFixture.make(seed: 4, pages: 40, segmentBytes: 64 << 10)
        let sealed = try #require(try fixture.inspect().report.segmentDetails.first { $0.state == "sealed" })
        // The index block is the last block-aligned stretch of a sealed segment; damage its entries.
        let size = try fixture.storage.open(fixture.segmentPath(sealed.id), .read).size()
        let entriesBytes = IndexBlock.length(entries: try #require(sealed.indexEntries))
        fixture.storage.corrupt(fixture.segmentPath(sealed.id), at: size - Block.roundUp(entriesBytes) + 40)
        let r = try fixture.inspect().report
        #expect(r.corruptIndexBlocks == 1)
        #expect(r.corruptRecords == 0)
        #expect(r.corrupt == 1)
        #expect(r.pages == 40, "the records themselves are intact")
        #expect(r.problems.contains { $0.contains(SegmentHeader.fileName(sealed.id)) && $0.contains("index block") })
    }

    @Test func aTornTailIsReportedButIsNotCorruption() async throws {
        let fixture = try await DiskStoreFixture.make(seed: 5, pages: 5)
        let last = try #require(fixture.written.last)
        let file = try fixture.storage.open(fixture.segmentPath(last.segment), .readWriteCreate)
        try file.truncate(to: last.offset + last.recordBytes / 2)
        let size = try file.size()
        let r = try fixture.inspect().report
        #expect(r.tornTailBytes == last.recordBytes / 2)
        #expect(r.corrupt == 0)
        #expect(r.ok)
        #expect(r.pages == 4)
        #expect(try file.size() == size, "verify must not truncate the torn tail as recovery would")
    }

    /// "Also broken today": flips spread over every record of the active segment, with no valid
    /// record after them, were called a torn tail (`ok: true`). Every record but the last was
    /// synced before the last group was written: damage there is corruption.
    @Test func damageBelowTheAcknowledgedEndOfTheActiveSegmentIsCorruption() async throws {
        let fixture = try await DiskStoreFixture.make(seed: 9, pages: 4)
        let segment = try #require(fixture.written.first?.segment)
        #expect(fixture.written.allSatisfy { $0.segment == segment })
        let path = fixture.segmentPath(segment)
        let end = try fixture.storage.open(path, .read).size()
        let step = (end - Block.size) / 16
        for i in 0..<16 { fixture.storage.corrupt(path, at: Block.size + 1000 + i * step, bit: i % 8) }
        let r = try fixture.inspect().report
        #expect(!r.ok, "\(r.problems)")
        #expect(r.corruptRecords >= 1)
        #expect(r.pages < 4)

        // Recovery keeps what was acknowledged: it counts the damage instead of cutting it off.
        let tier = try DiskTier(storage: fixture.storage, logger: diskTestLogger)
        #expect(tier.recovery.damagedRecords >= 1)
        let lastAcknowledged = fixture.written[2]
        #expect(try fixture.storage.open(path, .read).size() >= lastAcknowledged.offset + lastAcknowledged.recordBytes,
                "acknowledged records must not be truncated away")
        await tier.close()
        // The damaged segment is kept for inspection, out of service: its readable records
        // were copied, the file moved to quarantine/.
        let after = try fixture.inspect().report
        #expect(after.quarantine.segments == 1 && after.quarantine.corruptRecords >= 1, "\(after)")
        #expect(tier.stats.quarantinedSegments == 1)
    }

    /// `kvtier pages` must list exactly what recovery serves: a tombstone deletes the record it
    /// names and any older one (an older record survives in a segment compaction kept).
    @Test func theInspectorAndRecoveryAgreeOnWhatATombstoneDeletes() async throws {
        let storage = SimulatedStorage(seed: 10)
        var configuration = DiskTierConfiguration()
        configuration.segmentBytes = 64 << 10
        let tier = try DiskTier(storage: storage, configuration: configuration, logger: diskTestLogger)
        let codec = Codec(.fp16, .zstd(level: 1))
        let shape = DiskStoreFixture.shape
        var next = 1
        func fill(until segment: UInt64) async throws -> [Int] {
            var written: [Int] = []
            while true {
                let page = try await tier.write(DiskStoreFixture.address(next), modelID: 1, codec: codec, shape: shape,
                                                data: DiskStoreFixture.data(next))
                written.append(next)
                next += 1
                if page.segment != segment { return written }
            }
        }
        let first = try await tier.write(DiskStoreFixture.address(0), modelID: 1, codec: codec, shape: shape, data: DiskStoreFixture.data(0))
        _ = try await fill(until: first.segment)
        let rewritten = try await tier.write(DiskStoreFixture.address(0), modelID: 1, codec: codec, shape: shape, data: DiskStoreFixture.data(0))
        #expect(rewritten.segment != first.segment)
        let second = try await fill(until: rewritten.segment)
        // Delete the page and everything else in its second segment: compaction drops that
        // segment (nothing live), the first segment keeps the stale record, the tombstone stays.
        try await tier.delete(DiskStoreFixture.address(0))
        for n in second {
            if tier.page(DiskStoreFixture.address(n))?.segment == rewritten.segment { try await tier.delete(DiskStoreFixture.address(n)) }
        }
        await tier.close()

        let inspection = try DiskInspector(storage: storage, directory: "store").inspect()
        #expect(!inspection.report.segmentDetails.contains { $0.id == rewritten.segment }, "the rewritten record's segment was compacted")
        #expect(inspection.report.segmentDetails.contains { $0.id == first.segment }, "the stale record's segment is still there")
        let recovered = try DiskTier(storage: storage, configuration: configuration, logger: diskTestLogger)
        #expect(!recovered.contains(DiskStoreFixture.address(0)))
        let listed = Set(inspection.pages.map(\.key))
        let served = Set(recovered.pages().map { $0.address.key.description })
        #expect(listed == served, "listed but not served: \(listed.subtracting(served)); served but not listed: \(served.subtracting(listed))")
        await recovered.close()
    }

    @Test func aDamagedManifestIsReportedAndThePagesStillCount() async throws {
        let fixture = try await DiskStoreFixture.make(seed: 6, pages: 8)
        fixture.storage.corrupt("\(DiskStoreFixture.directory)/\(Manifest.fileName)", at: 20)
        let r = try fixture.inspect().report
        #expect(r.corruptManifest == 1)
        #expect(r.corrupt == 1)
        #expect(r.manifest.present && !r.manifest.valid)
        #expect(r.problems.contains { $0.hasPrefix(Manifest.fileName) })
        #expect(r.pages == 8, "recovery would rebuild the manifest from the segments")
    }

    @Test func aMissingSegmentAndAnOrphanAreTold() async throws {
        let fixture = try await DiskStoreFixture.make(seed: 7, pages: 40, segmentBytes: 64 << 10)
        let ids = try fixture.inspect().report.segmentDetails.map(\.id)
        try fixture.storage.remove(fixture.segmentPath(try #require(ids.first)))
        let orphan = try fixture.storage.open(fixture.segmentPath(999), .readWriteCreate)
        try orphan.write(SegmentHeader(segmentID: 999, storeID: PageKey(high: 1, low: 1), createdMicros: 0).encoded(), at: 0)
        let r = try fixture.inspect().report
        #expect(r.missingSegments == 1)
        #expect(r.orphanSegments == 1)
        #expect(r.corrupt == 1, "an orphan is a crash leftover, not corruption")
    }

    @Test func realFilesInATemporaryFolder() async throws {
        let root = "/tmp/kvtier-tools-inspect-\(UInt64.random(in: 0...UInt64.max))"
        defer { try? FileManager.default.removeItem(atPath: root) }
        let selection = try BlockReaders.make(logger: diskTestLogger)
        defer { selection.reader.close() }
        let storage = PosixStorage(root: root, reader: selection.reader, logger: diskTestLogger)
        try storage.makeDirectory("")
        let tier = try DiskTier(storage: storage, logger: diskTestLogger)
        for n in 0..<3 {
            try await tier.write(DiskStoreFixture.address(n), modelID: 1, codec: Codec(.k4v4), shape: DiskStoreFixture.shape,
                                 data: DiskStoreFixture.data(n))
        }
        await tier.close()

        for path in [root, "\(root)/store"] {
            let (inspector, reader) = try DiskInspector.open(path, logger: diskTestLogger)
            defer { reader.close() }
            let inspection = try inspector.inspect()
            #expect(inspection.report.ok)
            #expect(inspection.report.pages == 3)
            #expect(inspection.pages.allSatisfy { $0.codec == "k4v4" })
            #expect(inspection.report.directory == "\(root)/store")
        }
        #expect(throws: ToolError.self) { try DiskInspector.open("\(root)/nothing-here", logger: diskTestLogger) }
    }
}
