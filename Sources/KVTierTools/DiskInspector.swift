import KVTierCore
import KVTierIO
import KVTierStore
import Logging

/// The reference reader of the disk format (docs/format.md): reads every record of every segment
/// with `SegmentScanner` and works out the live pages with `RecordReplay` (the scanner and the
/// replay rule recovery uses, so the two cannot drift), checks each sealed segment's index block
/// against the records and the manifest against the files. It only reads:
/// nothing is truncated, sealed, rebuilt or removed, so it is safe on a store a daemon has open.
/// The engine of `kvtier verify` and `kvtier pages`.
public struct DiskInspector {
    public let storage: any Storage
    /// The store folder (MANIFEST, seg-*.kvs, quarantine/) relative to the storage root; "" for the root.
    public let directory: String
    /// How reports name the store (`directory` unless set).
    public var displayName: String

    /// Manifests larger than this are damage, not something to allocate for (recovery's limit too).
    static let maxManifestBytes = 64 << 20
    /// Findings listed per segment before the rest are only counted.
    static let maxProblemsPerSegment = 16

    public init(storage: any Storage, directory: String) {
        self.storage = storage
        self.directory = directory
        self.displayName = directory
    }

    func path(_ name: String) -> String { directory.isEmpty ? name : "\(directory)/\(name)" }

    enum Role {
        case listed(Manifest.Segment?)
        case orphan
        case quarantined
    }

    struct Planned {
        var id: UInt64
        var path: String
        var name: String
        var role: Role
        var file: any StorageFile
        var size: Int
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
        let names = try storage.list(directory)
        var inStore: [UInt64: String] = [:]
        for name in names {
            if let id = SegmentHeader.id(fromFileName: name) { inStore[id] = name }
        }
        var inQuarantine: [UInt64: String] = [:]
        if names.contains("quarantine") {
            for name in (try? storage.list(path("quarantine"))) ?? [] {
                if let id = SegmentHeader.id(fromFileName: name) { inQuarantine[id] = name }
            }
        }

        let manifest = readManifest(&report, segmentFiles: inStore.count)
        if names.contains("\(Manifest.fileName).tmp") {
            report.problems.append("\(Manifest.fileName).tmp: left by an interrupted manifest rewrite; the next start removes it")
        }

        // Which files to read, and what each is meant to be.
        var plan: [Planned] = []
        var listedIDs = Set<UInt64>()
        var quarantinedIDs = Set<UInt64>()
        if let manifest {
            var active = 0
            for entry in manifest.segments {
                let name = SegmentHeader.fileName(entry.id)
                if entry.state == .quarantined {
                    quarantinedIDs.insert(entry.id)
                    if inQuarantine[entry.id] == nil && inStore[entry.id] == nil {
                        report.problems.append("\(name): quarantined by the manifest but not in quarantine/")
                    }
                    continue
                }
                listedIDs.insert(entry.id)
                if entry.state == .active { active += 1 }
                guard inStore[entry.id] != nil else {
                    report.missingSegments += 1
                    report.problems.append("\(name): named by the manifest (\(Self.stateName(entry.state))) but missing")
                    continue
                }
                plan.append(try planned(entry.id, path(name), name, .listed(entry)))
            }
            if active > 1 {
                report.problems.append("MANIFEST: \(active) active segments; the next start seals all but the newest")
            }
        } else {
            // Recovery rebuilds the manifest from every segment file; read them as it would.
            for id in inStore.keys.sorted() {
                listedIDs.insert(id)
                plan.append(try planned(id, path(inStore[id]!), inStore[id]!, .listed(nil)))
            }
        }
        plan.sort { $0.id < $1.id }
        for id in inStore.keys.sorted() where !listedIDs.contains(id) {
            let name = inStore[id]!
            if quarantinedIDs.contains(id) {
                report.problems.append("\(name): quarantined by the manifest but still in the store folder")
                plan.append(try planned(id, path(name), name, .quarantined))
            } else {
                report.orphanSegments += 1
                report.problems.append("\(name): orphan (no manifest entry names it); the next start removes it")
                plan.append(try planned(id, path(name), name, .orphan))
            }
        }
        for id in inQuarantine.keys.sorted() {
            let name = inQuarantine[id]!
            plan.append(try planned(id, path("quarantine/\(name)"), "quarantine/\(name)", .quarantined))
        }

        var storeID = manifest?.storeID
        if storeID == nil, let first = plan.first(where: { if case .listed = $0.role { true } else { false } }) {
            storeID = Self.segmentHeader(first.file)?.storeID
        }
        report.storeID = storeID?.description

        let totalBytes = plan.reduce(0) { $0 + $1.size }
        var bytesDone = 0
        var live: [(header: RecordHeader, segment: UInt64, offset: Int)] = []
        var replayed: [RecordReplay.Entry] = []
        for (done, item) in plan.enumerated() {
            let (records, lost) = try check(item, storeID: storeID, into: &report)
            live += records.map { ($0.header, item.id, $0.offset) }
            replayed += records.map { RecordReplay.Entry(header: $0.header, segment: item.id, offset: $0.offset) }
            replayed += lost.map { RecordReplay.Entry(header: $0.header, segment: item.id, offset: $0.offset, damaged: true) }
            bytesDone += item.size
            report.fileBytes += item.size
            progress(DiskInspectionProgress(segmentsDone: done + 1, segments: plan.count, bytesDone: bytesDone, bytes: totalBytes))
        }

        // Sequence numbers are store-wide; a repeat means two records claim the same write.
        live.sort { $0.header.sequence < $1.header.sequence }
        for i in live.indices.dropFirst() where live[i].header.sequence == live[i - 1].header.sequence {
            report.sequenceErrors += 1
            report.problems.append("\(SegmentHeader.fileName(live[i].segment)) offset \(live[i].offset): sequence \(live[i].header.sequence) is also used at \(SegmentHeader.fileName(live[i - 1].segment)) offset \(live[i - 1].offset)")
        }

        // Apply in write order with recovery's own replay.
        let pages = RecordReplay.live(replayed).values.map { (header: $0.header, segment: $0.segment, offset: $0.offset) }
            .sorted { ($0.segment, $0.offset) < ($1.segment, $1.offset) }
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

    private func planned(_ id: UInt64, _ path: String, _ name: String, _ role: Role) throws(StorageError) -> Planned {
        let file = try storage.open(path, .read)
        return Planned(id: id, path: path, name: name, role: role, file: file, size: try file.size())
    }

    // MARK: the manifest

    private func readManifest(_ report: inout DiskVerifyReport, segmentFiles: Int) -> Manifest? {
        let name = Manifest.fileName
        guard storage.exists(path(name)) else {
            if segmentFiles > 0 {
                report.corruptManifest = 1
                report.problems.append("\(name): missing while \(segmentFiles) segment files exist; the next start rebuilds it by scanning them")
            }
            return nil
        }
        report.manifest.present = true
        do {
            let file = try storage.open(path(name), .read)
            defer { file.close() }
            let size = try file.size()
            guard size <= Self.maxManifestBytes else {
                report.corruptManifest = 1
                report.problems.append("\(name): \(size) bytes, more than any manifest; the next start rebuilds it")
                return nil
            }
            let buffer = PageBuffer(byteCount: max(size, 1))
            let got = try file.read(into: buffer.bytes, at: 0)
            let manifest = try Manifest(decoding: UnsafeRawBufferPointer(rebasing: buffer.readOnly[0..<got]))
            report.manifest.valid = true
            report.manifest.epoch = manifest.epoch
            report.manifest.nextSegmentID = manifest.nextSegmentID
            report.manifest.entries = manifest.segments.count
            return manifest
        } catch {
            report.corruptManifest = 1
            report.problems.append("\(name): \(error); the next start rebuilds it by scanning the segments")
            return nil
        }
    }

    static func stateName(_ state: Manifest.SegmentState) -> String {
        switch state {
        case .active: "active"
        case .sealed: "sealed"
        case .quarantined: "quarantined"
        }
    }

    static func segmentHeader(_ file: any StorageFile) -> SegmentHeader? {
        let block = PageBuffer(overwrittenByteCount: Block.size)
        guard (try? file.read(into: block.bytes, at: 0)) == Block.size else { return nil }
        return try? SegmentHeader(decoding: block.readOnly)
    }

    // MARK: one segment

    /// Scans one file, adds its findings to `report`, and returns the records that count towards
    /// the live pages and the damaged records whose page is known lost (none for orphans,
    /// quarantined and foreign segments).
    private func check(_ item: Planned, storeID: PageKey?, into report: inout DiskVerifyReport) throws(StorageError)
        -> (records: [SegmentScanner.Record], lost: [SegmentScanner.Record]) {
        var described: Manifest.Segment?
        var counted = false
        var state: String
        switch item.role {
        case .listed(let entry):
            described = entry
            counted = true
            state = entry?.state == .sealed ? "sealed" : "active"
        case .orphan: state = "orphan"
        case .quarantined: state = "quarantined"
        }
        let sealed = described.map { $0.state == .sealed && $0.indexBytes > 0 && $0.sealedBytes >= Block.size } ?? false
        var summary = DiskVerifyReport.SegmentSummary(id: item.id, file: item.name, state: state, fileBytes: item.size)
        var problems: [String] = []
        var corruptRecords = 0

        var limit: Int? = nil
        if sealed, let described {
            if item.size < described.sealedBytes {
                problems.append("\(item.name): \(item.size) bytes, but the manifest sealed it at \(described.sealedBytes)")
                if counted { report.corruptSegments += 1 }
            }
            limit = min(described.sealedBytes, item.size)
        }
        // A sealed segment was wholly durable; an active one as far as its records say.
        let scan = try SegmentScanner(file: item.file).scan(limit: limit, acknowledged: sealed ? (limit ?? 0) : 0)

        guard let header = scan.segmentHeader else {
            let why = scan.damaged.first.map { "\($0.error)" } ?? "unreadable"
            problems.append("\(item.name) offset 0: segment header: \(why)")
            if counted { report.corruptSegments += 1 } else if case .quarantined = item.role { report.quarantine.corruptRecords += 1 }
            finish(item, summary, problems, into: &report, quarantineRecords: 0)
            return ([], [])
        }
        var foreign = false
        if header.segmentID != item.id {
            problems.append("\(item.name) offset 0: segment header names segment \(header.segmentID)")
            if counted { report.corruptSegments += 1 }
        }
        if let storeID, header.storeID != storeID {
            foreign = true
            problems.append("\(item.name) offset 0: belongs to store \(header.storeID), not \(storeID); the next start ignores it")
            if counted { report.corruptSegments += 1 }
        }

        for range in Self.damagedRanges(scan) {
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

        if sealed, let described {
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
        let lost = scan.damaged.compactMap { d in d.header.map { SegmentScanner.Record(header: $0, offset: d.offset) } }
        return counted && !foreign ? (scan.records, lost) : ([], [])
    }

    private func finish(_ item: Planned, _ summary: DiskVerifyReport.SegmentSummary, _ problems: [String],
                        into report: inout DiskVerifyReport, quarantineRecords: Int) {
        if case .quarantined = item.role {
            report.quarantine.segments += 1
            report.quarantine.records += quarantineRecords
            report.quarantine.fileBytes += item.size
        }
        report.segmentDetails.append(summary)
        report.problems += problems.prefix(Self.maxProblemsPerSegment)
        if problems.count > Self.maxProblemsPerSegment {
            report.problems.append("\(item.name): \(problems.count - Self.maxProblemsPerSegment) more findings not listed")
        }
    }

    /// Checks a sealed segment's index block against its records; returns its entry count, or nil
    /// when it cannot be read.
    private func checkIndex(_ item: Planned, _ described: Manifest.Segment, _ scan: SegmentScanner.Result,
                            problems: inout [String], counted: Bool, into report: inout DiskVerifyReport) -> Int? {
        let expectedEnd = described.indexOffset + Block.roundUp(described.indexBytes)
        if described.indexOffset != described.sealedBytes {
            problems.append("\(item.name): manifest puts the index block at \(described.indexOffset) but the records end at \(described.sealedBytes)")
        }
        if item.size > expectedEnd {
            problems.append("\(item.name) offset \(expectedEnd): \(item.size - expectedEnd) bytes after the index block")
        }
        let length = Block.roundUp(described.indexBytes)
        let buffer = PageBuffer(overwrittenByteCount: length)
        let entries: [IndexEntry]
        do {
            let got = try item.file.read(into: buffer.bytes, at: described.indexOffset)
            guard got >= described.indexBytes else { throw FormatError.truncated("index block") }
            entries = try IndexBlock.decode(UnsafeRawBufferPointer(rebasing: buffer.readOnly[0..<described.indexBytes]))
        } catch {
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
