import KVTierCore
import KVTierIO
import KVTierStore
import Logging

/// `kvtier verify` and `kvtier pages`: reads a store with `DiskImage`, the reader start-up
/// recovery uses (same manifest rule, same index blocks, same scans, same replay), so the pages
/// it lists are the pages a daemon opening the store would serve. On top of what recovery reads
/// it checks every record's bytes (sealed segments too), each sealed segment's index block
/// against its records, sequence numbers, and the manifest against the files. It only reads:
/// nothing is truncated, sealed, rebuilt or removed, so it is safe on a store a daemon has open.
public struct DiskInspector {
    public let storage: any Storage
    /// The store folder (MANIFEST, seg-*.kvs, quarantine/) relative to the storage root; "" for the root.
    public let directory: String
    /// How reports name the store (`directory` unless set).
    public var displayName: String

    /// Findings listed per segment before the rest are only counted.
    static let maxProblemsPerSegment = 16

    public init(storage: any Storage, directory: String) {
        self.storage = storage
        self.directory = directory
        self.displayName = directory
    }

    /// A run of invalid blocks and the first error in it: one damaged record (or several adjacent).
    struct DamagedRange {
        var offset: Int
        var end: Int
        var error: FormatError
    }

    /// Reads the whole store once. `progress` is called after each segment file.
    public func inspect(progress: (DiskInspectionProgress) -> Void = { _ in }) throws(StorageError) -> DiskInspection {
        let started = Clocks.monotonicNanoseconds()
        var report = DiskVerifyReport(directory: displayName)
        let image = try DiskImage.read(storage, directory: directory, purpose: .verify) { p in
            progress(DiskInspectionProgress(segmentsDone: p.segmentsDone, segments: p.segments, bytesDone: p.bytesDone, bytes: p.bytes))
        }
        defer { for segment in image.segments { segment.file.close() } }

        reportManifest(image, into: &report)
        report.storeID = image.storeID?.description

        for segment in image.segments {
            check(segment, into: &report)
            report.fileBytes += segment.fileBytes
        }

        // Sequence numbers are store-wide; a repeat means two records claim the same write.
        var records: [(header: RecordHeader, segment: UInt64, offset: Int)] = []
        for segment in image.segments where segment.counts {
            records += (segment.scan?.records ?? []).map { ($0.header, segment.id, $0.offset) }
        }
        records.sort { $0.header.sequence < $1.header.sequence }
        for i in records.indices.dropFirst() where records[i].header.sequence == records[i - 1].header.sequence {
            report.sequenceErrors += 1
            report.problems.append("\(SegmentHeader.fileName(records[i].segment)) offset \(records[i].offset): sequence \(records[i].header.sequence) is also used at \(SegmentHeader.fileName(records[i - 1].segment)) offset \(records[i - 1].offset)")
        }

        // The live pages, by the replay recovery builds its index with.
        let pages = image.livePages().values.sorted { ($0.segment, $0.offset) < ($1.segment, $1.offset) }
        var livePerSegment: [UInt64: Int] = [:]
        for page in pages {
            livePerSegment[page.segment, default: 0] += 1
            report.liveBytes += page.header.paddedBytes
        }
        for i in report.segmentDetails.indices where report.segmentDetails[i].state == "active" || report.segmentDetails[i].state == "sealed" {
            report.segmentDetails[i].livePages = livePerSegment[report.segmentDetails[i].id] ?? 0
        }
        report.pages = pages.count
        report.total()
        report.elapsedSeconds = Double(Clocks.monotonicNanoseconds() - started) / 1e9
        return DiskInspection(report: report, pages: pages.map { DiskPageEntry($0.header, segment: $0.segment, offset: $0.offset) })
    }

    // MARK: the manifest and the files it names

    private func reportManifest(_ image: DiskImage, into report: inout DiskVerifyReport) {
        let name = Manifest.fileName
        if let manifest = image.manifestOnDisk {
            report.manifest.present = true
            report.manifest.valid = true
            report.manifest.epoch = manifest.epoch
            report.manifest.nextSegmentID = manifest.nextSegmentID
            report.manifest.entries = manifest.segments.count
        } else if let problem = image.manifestProblem {
            report.corruptManifest = 1
            switch problem {
            case .missing:
                report.problems.append("\(name): \(problem); the next start rebuilds it by scanning them")
            case .tooLarge:
                report.manifest.present = true
                report.problems.append("\(name): \(problem); the next start rebuilds it")
            case .damaged, .unreadable:
                report.manifest.present = true
                report.problems.append("\(name): \(problem); the next start rebuilds it by scanning the segments")
            }
        }
        if image.temporaryManifest {
            report.problems.append("\(name).tmp: left by an interrupted manifest rewrite; the next start removes it")
        }
        for id in image.quarantinedMissing {
            report.problems.append("\(SegmentHeader.fileName(id)): quarantined by the manifest but not in quarantine/")
        }
        for entry in image.missing {
            report.missingSegments += 1
            report.problems.append("\(SegmentHeader.fileName(entry.id)): named by the manifest (\(Self.stateName(entry.state))) but missing")
        }
        let active = image.manifestOnDisk?.segments.filter { $0.state == .active }.count ?? 0
        if active > 1 {
            report.problems.append("\(name): \(active) active segments; the next start seals all but the newest")
        }
        for segment in image.segments {
            switch segment.role {
            case .orphan:
                report.orphanSegments += 1
                report.problems.append("\(segment.name): orphan (no manifest entry names it); the next start removes it")
            case .quarantined where !segment.name.hasPrefix("quarantine/"):
                report.problems.append("\(segment.name): quarantined by the manifest but still in the store folder")
            default: break
            }
        }
    }

    static func stateName(_ state: Manifest.SegmentState) -> String {
        switch state {
        case .active: "active"
        case .sealed: "sealed"
        case .quarantined: "quarantined"
        }
    }

    // MARK: one segment

    /// Adds one file's findings to `report`.
    private func check(_ item: DiskImage.Segment, into report: inout DiskVerifyReport) {
        let counted = item.role == .listed
        let state: String
        switch item.role {
        case .listed: state = item.entry?.state == .sealed ? "sealed" : "active"
        case .orphan: state = "orphan"
        case .quarantined: state = "quarantined"
        }
        let sealed = item.isSealed
        var summary = DiskVerifyReport.SegmentSummary(id: item.id, file: item.name, state: state, fileBytes: item.fileBytes)
        var problems: [String] = []
        var corruptRecords = 0

        var short = false
        if sealed, let described = item.entry, item.fileBytes < described.sealedBytes {
            short = true
            problems.append("\(item.name): \(item.fileBytes) bytes, but the manifest sealed it at \(described.sealedBytes)")
            if counted { report.corruptSegments += 1 }
        }
        guard let header = item.header, let scan = item.scan else {
            let why = item.headerError.map { "\($0)" } ?? "unreadable"
            problems.append("\(item.name) offset 0: segment header: \(why)")
            if counted { report.corruptSegments += 1 } else if item.role == .quarantined { report.quarantine.corruptRecords += 1 }
            finish(item, summary, problems, into: &report, quarantineRecords: 0)
            return
        }
        if header.segmentID != item.id {
            problems.append("\(item.name) offset 0: segment header names segment \(header.segmentID)")
            if counted { report.corruptSegments += 1 }
        }
        if item.foreign {
            problems.append("\(item.name) offset 0: belongs to store \(header.storeID), not \(report.storeID ?? "this one"); the next start ignores it")
            if counted { report.corruptSegments += 1 }
        }

        // A sealed file cut short was reported above; the scan's note of it is not another record.
        for range in Self.damagedRanges(scan) where !(short && range.offset >= item.fileBytes) {
            corruptRecords += 1
            problems.append("\(item.name) offset \(range.offset): damaged record (\(range.end - range.offset) bytes up to the next valid record): \(range.error)")
        }
        if scan.tailBytes > 0 {
            if sealed {
                corruptRecords += 1
                problems.append("\(item.name) offset \(scan.validEnd): \(scan.tailBytes) bytes before the index block are not valid records")
            } else if counted {
                summary.tornTailBytes = scan.tailBytes
                report.tornTailBytes += scan.tailBytes
                problems.append("\(item.name) offset \(scan.validEnd): torn tail of \(scan.tailBytes) bytes after the acknowledged end \(scan.acknowledgedEnd) (a write never acknowledged; the next start cuts it)")
            }
        }

        var previous: UInt64 = 0
        var outOfOrder = 0
        for record in scan.records {
            if record.header.sequence <= previous { outOfOrder += 1 }
            previous = record.header.sequence
            if record.header.kind == .tombstone { summary.tombstones += 1 }
        }
        if outOfOrder > 0 {
            problems.append("\(item.name): \(outOfOrder) records with a sequence not above the record before them")
            if counted { report.sequenceErrors += outOfOrder }
        }
        summary.records = scan.records.count
        summary.corruptRecords = corruptRecords

        if sealed, let described = item.entry, described.indexBytes > 0 {
            summary.indexEntries = checkIndex(item, described, scan, problems: &problems, counted: counted, into: &report)
        }

        switch item.role {
        case .listed:
            report.segments += 1
            if sealed { report.sealedSegments += 1 }
            report.records += scan.records.count
            report.tombstones += summary.tombstones
            report.pageRecords += scan.records.count - summary.tombstones
            report.corruptRecords += corruptRecords
        case .orphan: break
        case .quarantined: report.quarantine.corruptRecords += corruptRecords
        }
        finish(item, summary, problems, into: &report, quarantineRecords: scan.records.count)
    }

    private func finish(_ item: DiskImage.Segment, _ summary: DiskVerifyReport.SegmentSummary, _ problems: [String],
                        into report: inout DiskVerifyReport, quarantineRecords: Int) {
        if item.role == .quarantined {
            report.quarantine.segments += 1
            report.quarantine.records += quarantineRecords
            report.quarantine.fileBytes += item.fileBytes
        }
        report.segmentDetails.append(summary)
        report.problems += problems.prefix(Self.maxProblemsPerSegment)
        if problems.count > Self.maxProblemsPerSegment {
            report.problems.append("\(item.name): \(problems.count - Self.maxProblemsPerSegment) more findings not listed")
        }
    }

    /// Checks a sealed segment's index block against its records; returns its entry count, or nil
    /// when it cannot be read.
    private func checkIndex(_ item: DiskImage.Segment, _ described: Manifest.Segment, _ scan: SegmentScanner.Result,
                            problems: inout [String], counted: Bool, into report: inout DiskVerifyReport) -> Int? {
        let expectedEnd = described.indexOffset + Block.roundUp(described.indexBytes)
        if described.indexOffset != described.sealedBytes {
            problems.append("\(item.name): manifest puts the index block at \(described.indexOffset) but the records end at \(described.sealedBytes)")
        }
        if item.fileBytes > expectedEnd {
            problems.append("\(item.name) offset \(expectedEnd): \(item.fileBytes - expectedEnd) bytes after the index block")
        }
        guard let entries = item.index else {
            let error = item.indexError.map { "\($0)" } ?? "unreadable"
            problems.append("\(item.name) offset \(described.indexOffset): index block: \(error); the next start scans the segment instead")
            if counted { report.corruptIndexBlocks += 1 }
            return nil
        }
        var valid: [Int: RecordHeader] = [:]
        for record in scan.records { valid[record.offset] = record.header }
        let damaged = Self.damagedRanges(scan)
        func isDamaged(_ offset: Int) -> Bool {
            damaged.contains { $0.offset <= offset && offset < $0.end } || (offset >= scan.validEnd && scan.tailBytes > 0)
        }
        var disagreements: [String] = []
        var indexed = Set<Int>()
        for entry in entries {
            indexed.insert(entry.offset)
            if let header = valid[entry.offset] {
                if header != entry.header {
                    disagreements.append("entry for offset \(entry.offset) lists sequence \(entry.header.sequence), the record there has \(header.sequence)")
                }
            } else if !isDamaged(entry.offset) {
                disagreements.append("entry for offset \(entry.offset) (sequence \(entry.header.sequence)) names no record")
            }
        }
        for record in scan.records where !indexed.contains(record.offset) {
            disagreements.append("record at offset \(record.offset) (sequence \(record.header.sequence)) is not listed")
        }
        if !disagreements.isEmpty {
            if counted { report.corruptIndexBlocks += 1 }
            problems.append("\(item.name) offset \(described.indexOffset): index block disagrees with the records in \(disagreements.count) places; first: \(disagreements[0])")
        }
        return entries.count
    }

    /// The scanner's damage as ranges: each ends at the next record start (a run of unreadable
    /// blocks counts once; a damaged record whose header checks is one range of its own).
    static func damagedRanges(_ scan: SegmentScanner.Result) -> [DamagedRange] {
        scan.damaged.filter { $0.offset > 0 }.sorted { $0.offset < $1.offset }
            .map { DamagedRange(offset: $0.offset, end: $0.end, error: $0.error) }
    }
}

extension DiskInspector {
    /// An inspector over the store at `path`: the store folder itself (MANIFEST, seg-*.kvs) or a
    /// state directory holding `store/`. Files are opened read-only; the returned reader is unused
    /// by the inspector (`PosixStorage` needs one) and should be closed when done.
    public static func open(_ path: String, logger: Logger) throws -> (inspector: DiskInspector, reader: any BlockReader) {
        let reader = try PreadReader(threads: 1, logger: logger)
        let storage = PosixStorage(root: path, reader: reader, logger: logger)
        func isStore(_ directory: String) -> Bool {
            guard let names = try? storage.list(directory) else { return false }
            return names.contains(Manifest.fileName) || names.contains { SegmentHeader.id(fromFileName: $0) != nil }
        }
        let directory = DiskTierConfiguration().directory
        for candidate in ["", directory] where isStore(candidate) {
            var inspector = DiskInspector(storage: storage, directory: candidate)
            inspector.displayName = candidate.isEmpty ? storage.root : "\(storage.root)/\(candidate)"
            return (inspector, reader)
        }
        reader.close()
        throw ToolError("'\(path)' is not a KVTier store: no MANIFEST or seg-*.kvs in it or in its \(directory)/ folder")
    }
}
