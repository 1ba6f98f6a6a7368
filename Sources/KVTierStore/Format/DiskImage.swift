import KVTierCore

/// One read of a store folder as docs/format.md ("Recovery", steps 1–4) describes it: the
/// manifest, each segment's header, sealed segments' index blocks or a scan of the others, and
/// the records to replay. The one reader of the disk format: start-up recovery builds the disk
/// tier's index from it (and then cuts torn tails, removes orphans, quarantines and seals, which
/// this type never does), and `kvtier verify`/`kvtier pages` report it. Both get the live pages
/// from `replay`, over the same records, so they cannot disagree on which pages a store holds.
///
/// It only reads: nothing is truncated, sealed, rebuilt or removed.
public struct DiskImage {
    public enum Purpose: Sendable {
        /// Start-up: listed segments are opened for writing (recovery appends to them); a sealed
        /// segment's records come from its index block, and only segments without a usable one
        /// are scanned.
        case recovery
        /// `kvtier verify`: every file is opened read-only and every record of every segment is
        /// read and checked, sealed ones too (their index block still says which records count,
        /// as it does for recovery), and orphan and quarantined files are read for the report.
        case verify
    }

    /// Why the manifest in effect is not the one on disk.
    public enum ManifestProblem: Error, Equatable, CustomStringConvertible {
        /// No MANIFEST while segment files exist.
        case missing(segmentFiles: Int)
        /// Larger than any manifest (`maxManifestBytes`).
        case tooLarge(bytes: Int)
        case damaged(FormatError)
        case unreadable(StorageError)

        public var description: String {
            switch self {
            case .missing(let files): "missing while \(files) segment files exist"
            case .tooLarge(let bytes): "\(bytes) bytes, more than any manifest"
            case .damaged(let error): "\(error)"
            case .unreadable(let error): "\(error)"
            }
        }
    }

    /// What a segment file is to the store.
    public enum Role: Sendable, Equatable {
        /// Named by the manifest in effect, not quarantined: its records count.
        case listed
        /// No manifest entry names it: left by a crash mid-rotation or mid-compaction (read for `.verify` only).
        case orphan
        /// In quarantine/, or quarantined by the manifest (read for `.verify` only).
        case quarantined
    }

    public struct Segment {
        public var id: UInt64
        /// Path relative to the storage root.
        public var path: String
        /// Path inside the store folder: "seg-….kvs" or "quarantine/seg-….kvs".
        public var name: String
        public var role: Role
        /// The manifest entry in effect (listed segments only).
        public var entry: Manifest.Segment?
        public var file: any StorageFile
        public var fileBytes: Int
        /// Nil when block 0 does not check: nothing in the segment can be.
        public var header: SegmentHeader?
        public var headerError: FormatError?
        /// The header names another store: its records never count.
        public var foreign = false
        /// The decoded index block of a sealed segment; nil when it has none or it is unreadable.
        public var index: [IndexEntry]?
        public var indexError: FormatError?
        /// The scan of its records: every readable segment for `.verify`; for `.recovery`, those
        /// without a usable index block.
        public var scan: SegmentScanner.Result?
        /// The records that count towards the live pages: the index block's entries when it
        /// loaded, the scan's valid records otherwise.
        public var records: [IndexEntry] = []
        /// True when `records` came from the index block.
        public var recordsFromIndex = false

        /// Whether its records count towards the live pages.
        public var counts: Bool { role == .listed && header != nil && !foreign }

        /// Whether the manifest calls it sealed with a length: it was wholly durable up to it,
        /// and its index block (if any) follows it.
        public var isSealed: Bool { entry.map { $0.state == .sealed && $0.sealedBytes >= Block.size } ?? false }
    }

    /// How far a read has got, for progress lines: called after each segment file.
    public struct Progress: Sendable {
        public var segmentsDone: Int
        public var segments: Int
        public var bytesDone: Int
        public var bytes: Int
    }

    /// Manifests larger than this are damage, not something to allocate for.
    public static let maxManifestBytes = 64 << 20

    /// The store folder, relative to the storage root ("" for the root).
    public var directory: String
    /// MANIFEST as read; nil when missing or damaged (`manifestProblem` says which).
    public var manifestOnDisk: Manifest?
    public var manifestProblem: ManifestProblem?
    /// The manifest in effect: the one on disk, or one rebuilt from the segment files (each one
    /// active) when it is missing or damaged; nil for a new store (no manifest, no segment files).
    public var manifest: Manifest?
    /// True when `manifest` was rebuilt from the segment files.
    public var manifestRebuilt = false
    /// The store's ID: the manifest's, or when it was rebuilt the first readable segment header's.
    public var storeID: PageKey?
    /// MANIFEST.tmp exists: an interrupted manifest rewrite.
    public var temporaryManifest = false
    /// Segments the manifest names (not quarantined) whose files are gone.
    public var missing: [Manifest.Segment] = []
    /// Segments the manifest quarantined whose file is in neither the store folder nor quarantine/.
    public var quarantinedMissing: [UInt64] = []
    /// Segment files the manifest does not name (found for both purposes; read for `.verify` only).
    public var orphans: [UInt64] = []
    /// Listed segments in ID order, then (for `.verify`) orphans and quarantined files.
    public var segments: [Segment] = []

    /// Reads the store under `directory`. Throws only when the folder cannot be listed or a
    /// segment file the manifest names cannot be opened or read; damage is in the result.
    public static func read(_ storage: any Storage, directory: String, purpose: Purpose,
                            progress: (Progress) -> Void = { _ in }) throws(StorageError) -> DiskImage {
        func path(_ name: String) -> String { directory.isEmpty ? name : "\(directory)/\(name)" }
        var image = DiskImage(directory: directory)
        let names = try storage.list(directory)
        var inStore: [UInt64: String] = [:]
        for name in names {
            if let id = SegmentHeader.id(fromFileName: name) { inStore[id] = name }
        }
        image.temporaryManifest = names.contains("\(Manifest.fileName).tmp")

        switch readManifest(storage, path(Manifest.fileName)) {
        case .success(let manifest?):
            image.manifestOnDisk = manifest
            image.manifest = manifest
        case .success(nil):
            if !inStore.isEmpty { image.manifestProblem = .missing(segmentFiles: inStore.count) }
        case .failure(let problem):
            image.manifestProblem = problem
        }
        if image.manifest == nil, !inStore.isEmpty {
            image.manifestRebuilt = true
            image.manifest = Manifest(epoch: 0, storeID: PageKey(high: 0, low: 0), nextSegmentID: inStore.keys.max()! + 1,
                                      segments: inStore.keys.sorted().map { Manifest.Segment(id: $0, state: .active) })
        }

        // The listed segments, in ID order.
        let mode: OpenMode = purpose == .recovery ? .readWriteCreate : .read
        let entries = (image.manifest?.segments ?? []).sorted { $0.id < $1.id }
        var listed: [Segment] = []
        for entry in entries where entry.state != .quarantined {
            guard let name = inStore[entry.id] else {
                image.missing.append(entry)
                continue
            }
            listed.append(try open(storage, entry.id, path(name), name, .listed, entry, mode))
        }
        if image.manifestRebuilt {
            image.storeID = listed.lazy.compactMap(\.header).first?.storeID
            if let storeID = image.storeID { image.manifest!.storeID = storeID }
        } else {
            image.storeID = image.manifest?.storeID
        }

        // Files no entry names, and what quarantine holds: only the report reads them.
        let named = Set(entries.map(\.id))
        let quarantinedIDs = Set(entries.filter { $0.state == .quarantined }.map(\.id))
        image.orphans = inStore.keys.filter { !named.contains($0) }.sorted()
        var inQuarantine: [UInt64: String] = [:]
        if names.contains("quarantine") {
            for name in (try? storage.list(path("quarantine"))) ?? [] {
                if let id = SegmentHeader.id(fromFileName: name) { inQuarantine[id] = name }
            }
        }
        image.quarantinedMissing = quarantinedIDs.filter { inStore[$0] == nil && inQuarantine[$0] == nil }.sorted()
        var others: [Segment] = []
        if purpose == .verify {
            for id in inStore.keys.sorted() where !named.contains(id) || quarantinedIDs.contains(id) {
                let name = inStore[id]!
                others.append(try open(storage, id, path(name), name, quarantinedIDs.contains(id) ? .quarantined : .orphan, nil, .read))
            }
            for id in inQuarantine.keys.sorted() {
                let name = "quarantine/\(inQuarantine[id]!)"
                others.append(try open(storage, id, path(name), name, .quarantined, nil, .read))
            }
        }

        let all = listed + others
        let totalBytes = all.reduce(0) { $0 + $1.fileBytes }
        var bytesDone = 0
        for var segment in all {
            if let header = segment.header, let storeID = image.storeID, header.storeID != storeID { segment.foreign = true }
            try load(&segment, purpose: purpose)
            bytesDone += segment.fileBytes
            image.segments.append(segment)
            progress(Progress(segmentsDone: image.segments.count, segments: all.count, bytesDone: bytesDone, bytes: totalBytes))
        }
        return image
    }

    /// Reads a segment's index block and scans it, as `purpose` needs.
    private static func load(_ segment: inout Segment, purpose: Purpose) throws(StorageError) {
        guard segment.header != nil else { return }
        let verify = purpose == .verify
        if segment.role == .listed, !segment.foreign || verify {
            if segment.isSealed, let entry = segment.entry, entry.indexBytes > 0 {
                switch readIndex(segment.file, entry) {
                case .success(let entries): segment.index = entries
                case .failure(let error): segment.indexError = error
                }
            }
        }
        if segment.role == .listed, segment.foreign, !verify { return }
        if segment.index == nil || verify {
            // A sealed segment was wholly durable up to its sealed length, and its index block
            // lies beyond it; an unsealed one was durable as far as its records say.
            var limit: Int? = nil
            var acknowledged = 0
            if segment.isSealed, let entry = segment.entry {
                limit = min(entry.sealedBytes, segment.fileBytes)
                acknowledged = entry.sealedBytes
            }
            segment.scan = try SegmentScanner(file: segment.file).scan(limit: limit, acknowledged: acknowledged)
        }
        if let index = segment.index {
            segment.records = index
            segment.recordsFromIndex = true
        } else if let scan = segment.scan {
            segment.records = scan.records.map { IndexEntry($0.header, offset: $0.offset) }
        }
    }

    private static func open(_ storage: any Storage, _ id: UInt64, _ path: String, _ name: String, _ role: Role,
                             _ entry: Manifest.Segment?, _ mode: OpenMode) throws(StorageError) -> Segment {
        let file = try storage.open(path, mode)
        var segment = Segment(id: id, path: path, name: name, role: role, entry: entry, file: file, fileBytes: try file.size())
        let block = PageBuffer(overwrittenByteCount: Block.size)
        do {
            guard try file.read(into: block.bytes, at: 0) == Block.size else { throw FormatError.truncated("segment header") }
            segment.header = try SegmentHeader(decoding: block.readOnly)
        } catch let error as FormatError {
            segment.headerError = error
        } catch {
            segment.headerError = .truncated("segment header (\(error))")
        }
        return segment
    }

    private static func readManifest(_ storage: any Storage, _ path: String) -> Result<Manifest?, ManifestProblem> {
        guard storage.exists(path) else { return .success(nil) }
        do throws(StorageError) {
            let file = try storage.open(path, .read)
            defer { file.close() }
            let size = try file.size()
            guard size <= maxManifestBytes else { return .failure(.tooLarge(bytes: size)) }
            let buffer = PageBuffer(overwrittenByteCount: max(size, 1))
            let got = try file.read(into: buffer.bytes, at: 0)
            do {
                return .success(try Manifest(decoding: UnsafeRawBufferPointer(rebasing: buffer.readOnly[0..<got])))
            } catch {
                return .failure(.damaged(error))
            }
        } catch {
            return .failure(.unreadable(error))
        }
    }

    private static func readIndex(_ file: any StorageFile, _ entry: Manifest.Segment) -> Result<[IndexEntry], FormatError> {
        let buffer = PageBuffer(overwrittenByteCount: Block.roundUp(entry.indexBytes))
        do {
            guard try file.read(into: buffer.bytes, at: entry.indexOffset) >= entry.indexBytes else { throw FormatError.truncated("index block") }
            return .success(try IndexBlock.decode(UnsafeRawBufferPointer(rebasing: buffer.readOnly[0..<entry.indexBytes])))
        } catch let error as FormatError {
            return .failure(error)
        } catch {
            return .failure(.truncated("index block (\(error))"))
        }
    }

    // MARK: the live pages

    /// The records to replay, from the segments that count: each one's `records`, plus the
    /// records its scan found damaged behind an authentic header (their page is known lost).
    /// A record listed by an index block that the scan of the same segment (`.verify`) did not
    /// find intact is damaged too: reading it would fail, so its page is a miss, exactly as it
    /// is for the daemon, whose read of it fails.
    public var entries: [RecordReplay.Entry] {
        var entries: [RecordReplay.Entry] = []
        for segment in segments where segment.counts {
            var intact: [Int: RecordHeader]? = nil
            if segment.recordsFromIndex, let scan = segment.scan {
                intact = Dictionary(scan.records.map { ($0.offset, $0.header) }, uniquingKeysWith: { a, _ in a })
            }
            for record in segment.records {
                let damaged = intact.map { $0[record.offset] != record.header } ?? false
                entries.append(RecordReplay.Entry(header: record.header, segment: segment.id, offset: record.offset, damaged: damaged))
            }
            if !segment.recordsFromIndex, let scan = segment.scan {
                for damage in scan.damaged {
                    if let header = damage.header {
                        entries.append(RecordReplay.Entry(header: header, segment: segment.id, offset: damage.offset, damaged: true))
                    }
                }
            }
        }
        return entries
    }

    /// Applies the records in write order (`RecordReplay`) into `live`, each live record made by
    /// `make`. Returns one more than the highest sequence seen.
    public func replay<Live>(into live: inout [PageAddress: Live], sequence: (Live) -> UInt64,
                             make: (RecordReplay.Entry) -> Live) -> UInt64 {
        RecordReplay.replay(entries, into: &live, sequence: sequence, make: make)
    }

    /// The live record of every page.
    public func livePages() -> [PageAddress: RecordReplay.Entry] {
        RecordReplay.live(entries)
    }
}
