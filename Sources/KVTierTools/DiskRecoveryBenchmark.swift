#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import KVTierCodec
import KVTierCore
import KVTierIO
import KVTierStore
import Logging

/// Start-up time of a store holding many pages: the engine of `kvtier bench recovery`.
///
/// Writing a million real pages would take most of an hour, and recovery of sealed segments reads
/// only their index blocks. So the store is made directly with the format types: each sealed
/// segment is a header block, a hole where its records would be, and a real index block listing
/// them; the manifest names them sealed with their index offsets. The files are sparse (the index
/// blocks are all that is written: 104 bytes a page), and recovery does exactly the work it would
/// do on real pages. A page's record is never read, so its checksum is never checked.
public struct DiskRecoveryBenchmark: Sendable {
    public struct Report: Codable, Sendable {
        public var pages: Int
        public var segments: Int
        public var pagesPerSegment: Int
        /// Bytes of index blocks written (what recovery reads).
        public var indexBytes: Int
        public var generateSeconds: Double
        /// `DiskTier` construction after dropping the files from the page cache, wall clock.
        public var recoverySeconds: Double
        /// The same as recovery measures itself (`RecoveryReport.elapsedMicros`): without opening
        /// the tier's writer and rewriting the manifest.
        public var recoveryReportedSeconds: Double
        public var pagesPerSecond: Double
        /// A second start with the index blocks in the page cache.
        public var warmRecoverySeconds: Double
        public var recoveredPages: Int
        public var indexBlocksLoaded: Int
        public var directory: String
        public var kept: Bool
    }

    /// Segments are sealed at this size, as `DiskTierConfiguration.segmentBytes` defaults to.
    public var segmentBytes = DiskTierConfiguration().segmentBytes
    public var pages: Int
    public var parentDirectory: String
    public var keep: Bool

    /// A page of 8 tokens × 1 head × 64 in fp16, one layer: a 2148-byte record, one block.
    static let tinyShape = PageShape(tokens: 8, layers: 1, kvHeads: 1, headDim: 64)

    public init(pages: Int = 1_000_000, parentDirectory: String, keep: Bool = false) {
        self.pages = pages
        self.parentDirectory = parentDirectory
        self.keep = keep
    }

    public func run(logger: Logger) async throws -> Report {
        guard pages >= 1 else { throw ToolError("--pages must be at least 1") }
        var random = SystemRandomNumberGenerator()
        let runID = random.next() as UInt64
        let root = "\(parentDirectory.hasSuffix("/") ? String(parentDirectory.dropLast()) : parentDirectory)/kvtier-bench-recovery-\(PageKey.hex(runID))"
        let selection = try BlockReaders.make(logger: logger)
        defer {
            selection.reader.close()
            if !keep { try? FileManager.default.removeItem(atPath: root) }
        }
        let storage = PosixStorage(root: root, reader: selection.reader, logger: logger)
        let configuration = DiskTierConfiguration()
        let directory = configuration.directory
        try storage.makeDirectory(directory)

        let generateStart = Clocks.monotonicNanoseconds()
        let (segments, perSegment, indexBytes) = try generate(storage, directory, runID)
        let generateSeconds = Double(Clocks.monotonicNanoseconds() - generateStart) / 1e9

        let files = try storage.list(directory).filter { $0.hasPrefix("seg-") || $0 == Manifest.fileName }.map { "\(root)/\(directory)/\($0)" }
        for path in files { try SegmentFile(forReadingAt: .init(path), preferDirect: false).dropCachedPages() }
        let coldStart = Clocks.monotonicNanoseconds()
        var tier: DiskTier? = try DiskTier(storage: storage, configuration: configuration, logger: logger)
        let coldSeconds = Double(Clocks.monotonicNanoseconds() - coldStart) / 1e9
        let recovery = tier!.recovery
        await tier!.close()
        tier = nil

        let warmStart = Clocks.monotonicNanoseconds()
        tier = try DiskTier(storage: storage, configuration: configuration, logger: logger)
        let warmSeconds = Double(Clocks.monotonicNanoseconds() - warmStart) / 1e9
        await tier!.close()
        tier = nil

        guard recovery.pages == pages else { throw ToolError("recovery found \(recovery.pages) pages, \(pages) were generated") }
        return Report(
            pages: pages, segments: segments, pagesPerSegment: perSegment, indexBytes: indexBytes, generateSeconds: generateSeconds,
            recoverySeconds: coldSeconds, recoveryReportedSeconds: Double(recovery.elapsedMicros) / 1e6,
            pagesPerSecond: Double(pages) / coldSeconds, warmRecoverySeconds: warmSeconds, recoveredPages: recovery.pages,
            indexBlocksLoaded: recovery.indexBlocksLoaded, directory: root, kept: keep)
    }

    /// Writes the sealed segments, one empty active segment and the manifest.
    func generate(_ storage: PosixStorage, _ directory: String, _ runID: UInt64) throws -> (segments: Int, perSegment: Int, indexBytes: Int) {
        let perSegment = segmentBytes / Block.size - 1
        let segments = (pages + perSegment - 1) / perSegment
        var keys = SplitMix64(seed: runID)
        let storeID = PageKey(high: keys.next(), low: keys.next())
        let now = UInt64(Clocks.monotonicNanoseconds() / 1000)
        let codec = Codec(.fp16)
        let payload = Self.tinyShape.rawBytes
        let recordBytes = RecordHeader.size + 4 * Self.tinyShape.layers + payload
        var manifest = Manifest(epoch: 1, storeID: storeID, nextSegmentID: UInt64(segments) + 2, segments: [])
        var sequence: UInt64 = 0
        var indexBytes = 0
        for s in 0..<segments {
            let id = UInt64(s + 1)
            let count = min(perSegment, pages - s * perSegment)
            var entries: [IndexEntry] = []
            entries.reserveCapacity(count)
            for r in 0..<count {
                sequence += 1
                let address = PageAddress(tenant: TenantID(1000), key: PageKey(high: keys.next(), low: keys.next()))
                let header = RecordHeader(
                    kind: .page, recordBytes: recordBytes, checksum: UInt32(truncatingIfNeeded: keys.next()), sequence: sequence,
                    address: address, modelID: 0x11A3_A008_B000_0001, codecTag: codec.tag, shape: Self.tinyShape,
                    payloadBytes: payload, createdMicros: now)
                entries.append(IndexEntry(header, offset: (1 + r) * Block.size))
            }
            let indexOffset = (1 + count) * Block.size
            let index = IndexBlock.encode(entries)
            let file = try storage.open("\(directory)/\(SegmentHeader.fileName(id))", .readWriteCreate)
            try file.write(SegmentHeader(segmentID: id, storeID: storeID, createdMicros: now).encoded(), at: 0)
            // Writing past the end leaves the records' range a hole.
            try file.write(index, at: indexOffset)
            try file.sync()
            indexBytes += index.count
            manifest.segments.append(Manifest.Segment(id: id, state: .sealed, indexOffset: indexOffset,
                                                      indexBytes: IndexBlock.length(entries: count), sealedBytes: indexOffset))
        }
        let activeID = UInt64(segments + 1)
        let active = try storage.open("\(directory)/\(SegmentHeader.fileName(activeID))", .readWriteCreate)
        try active.write(SegmentHeader(segmentID: activeID, storeID: storeID, createdMicros: now).encoded(), at: 0)
        try active.sync()
        manifest.segments.append(Manifest.Segment(id: activeID, state: .active))
        let file = try storage.open("\(directory)/\(Manifest.fileName)", .readWriteCreate)
        try file.write(manifest.encoded(), at: 0)
        try file.sync()
        try storage.syncDirectory(directory)
        return (segments, perSegment, indexBytes)
    }
}
