import KVTierCodec
import KVTierCore
import KVTierStore

/// What `DiskInspector` found in a store: the `kvtier verify` report. Every count is over the
/// segments the manifest lists (or, without a usable manifest, every segment file, as recovery
/// would rebuild it); orphan and quarantined files are read too but reported on their own.
public struct DiskVerifyReport: Codable, Sendable, Equatable {
    public struct ManifestSummary: Codable, Sendable, Equatable {
        public var present = false
        public var valid = false
        public var epoch: UInt64 = 0
        public var nextSegmentID: UInt64 = 0
        /// Entries in the manifest, quarantined ones included.
        public var entries = 0
    }

    public struct QuarantineSummary: Codable, Sendable, Equatable {
        public var segments = 0
        public var records = 0
        public var corruptRecords = 0
        public var fileBytes = 0
    }

    public struct SegmentSummary: Codable, Sendable, Equatable {
        public var id: UInt64
        public var file: String
        /// "active", "sealed", "orphan" (no manifest entry names it) or "quarantined".
        public var state: String
        public var fileBytes: Int
        public var records = 0
        public var tombstones = 0
        public var livePages = 0
        public var corruptRecords = 0
        /// Entries of the sealed segment's index block; nil when it has none or it is unreadable.
        public var indexEntries: Int?
        public var tornTailBytes = 0
    }

    /// The store folder that was read.
    public var directory: String
    /// True when nothing is corrupt (`corrupt == 0`).
    public var ok = true
    public var storeID: String?
    public var manifest = ManifestSummary()
    /// Segment files of the store that were scanned (listed ones, not orphans or quarantined).
    public var segments = 0
    public var sealedSegments = 0
    /// Valid records read (pages and tombstones) in the listed segments.
    public var records = 0
    public var pageRecords = 0
    public var tombstones = 0
    /// Live pages after applying records in sequence order, as recovery does; pages whose record
    /// is damaged are not live (reading them would be a miss).
    public var pages = 0
    /// Block-padded bytes of the live pages' records.
    public var liveBytes = 0
    /// Bytes of every file read, orphans and quarantine included.
    public var fileBytes = 0
    /// Everything damaged: `corruptRecords + corruptIndexBlocks + corruptSegments +
    /// corruptManifest + missingSegments + sequenceErrors`.
    public var corrupt = 0
    /// Damaged record regions (a run of bad blocks up to the next valid record counts once).
    public var corruptRecords = 0
    /// Index blocks of sealed segments that cannot be read or disagree with the records.
    public var corruptIndexBlocks = 0
    /// Segment headers that are damaged, name another segment, or belong to another store.
    public var corruptSegments = 0
    /// 1 when MANIFEST is damaged, or missing while segment files exist.
    public var corruptManifest = 0
    /// Segments the manifest names whose files are gone.
    public var missingSegments = 0
    /// Sequence numbers that repeat or go backwards within a segment.
    public var sequenceErrors = 0
    /// Files no manifest entry names: left by a crash mid-rotation or mid-compaction, removed by
    /// the next start. Reported, not corrupt.
    public var orphanSegments = 0
    /// Bytes after the last valid record of unsealed segments: a write that never completed
    /// (never acknowledged), cut by the next start. Reported, not corrupt.
    public var tornTailBytes = 0
    public var quarantine = QuarantineSummary()
    /// One line per finding, naming the file and offset.
    public var problems: [String] = []
    public var segmentDetails: [SegmentSummary] = []
    public var elapsedSeconds = 0.0

    public init(directory: String) { self.directory = directory }

    mutating func total() {
        corrupt = corruptRecords + corruptIndexBlocks + corruptSegments + corruptManifest + missingSegments + sequenceErrors
        ok = corrupt == 0
    }
}

/// One live page as `kvtier pages` lists it.
public struct DiskPageEntry: Codable, Sendable, Equatable {
    /// 32 hex digits.
    public var key: String
    public var tenant: UInt32
    /// 16 hex digits.
    public var modelID: String
    public var tokens: Int
    public var layers: Int
    public var kvHeads: Int
    public var headDim: Int
    public var elementType: String
    public var codec: String
    public var recordBytes: Int
    /// Bytes on disk, block padding included.
    public var diskBytes: Int
    public var segment: UInt64
    public var offset: Int
    public var sequence: UInt64
    public var createdMicros: UInt64

    init(_ header: RecordHeader, segment: UInt64, offset: Int) {
        key = header.address.key.description
        tenant = header.address.tenant.rawValue
        modelID = PageKey.hex(header.modelID)
        tokens = header.shape.tokens
        layers = header.shape.layers
        kvHeads = header.shape.kvHeads
        headDim = header.shape.headDim
        elementType = header.shape.elementType == .float16 ? "float16" : "bfloat16"
        codec = (try? Codec(tag: header.codecTag).name) ?? "unknown(0x\(String(header.codecTag, radix: 16)))"
        recordBytes = header.recordBytes
        diskBytes = header.paddedBytes
        self.segment = segment
        self.offset = offset
        sequence = header.sequence
        createdMicros = header.createdMicros
    }
}

/// The whole result of one read-only pass over a store.
public struct DiskInspection: Sendable {
    public var report: DiskVerifyReport
    /// Live pages, by segment then offset.
    public var pages: [DiskPageEntry]
}

/// How far an inspection has got, for progress lines.
public struct DiskInspectionProgress: Sendable {
    public var segmentsDone: Int
    public var segments: Int
    public var bytesDone: Int
    public var bytes: Int
}
