import KVTierCodec
import KVTierCore

/// Settings of the disk tier; every default here is documented in docs/format.md and the
/// configuration reference.
public struct DiskTierConfiguration: Sendable {
    /// Folder under the storage root that holds MANIFEST and the segments.
    public var directory = "store"
    /// A segment is sealed once it holds this many bytes (a soft limit: one group may pass it).
    public var segmentBytes = 256 << 20
    /// Most bytes the segment files may take; nil for no limit. Over it, the coldest pages are
    /// deleted and segments compacted.
    public var budgetBytes: Int?
    /// Most bytes of page records one tenant may hold on disk; nil: no quota besides the budget
    /// (docs/configuration.md, `diskTenantQuota`). A tenant over it gives back its own pages;
    /// a write that would need another tenant's session pages is refused (`overBudget`).
    public var tenantBudgetBytes: Int?
    /// Sealed segments whose live fraction drops below this are compacted.
    public var compactionLiveFraction = 0.5
    /// Checksum failures in one segment that take it out of service.
    public var quarantineAfterFailures = 3
    /// Most records written and synced as one group.
    public var maxGroupRecords = 256
    /// Most record bytes compaction reads before writing them out (at least one record): it
    /// copies a segment group by group, so its memory does not grow with `segmentBytes`.
    public var compactionBatchBytes = 16 << 20
    /// After a failed write, new writes fail fast for this long before one retries the disk.
    public var retryAfterFailureMicros: UInt64 = 500_000
    /// Page reads in flight at once for `read(_:)` batches.
    public var readConcurrency = 32
    /// Most record bytes in flight at once for `read(_:)` batches (at least one page always is).
    public var readInFlightBytes = 256 << 20
    /// Most bytes of read buffers kept for reuse between reads.
    public var readBufferPoolBytes = 512 << 20

    public init() {}
}

/// Where a page lives and what it is.
public struct StoredPage: Sendable, Equatable {
    public var address: PageAddress
    public var modelID: UInt64
    public var codec: Codec
    public var shape: PageShape
    public var sequence: UInt64
    public var segment: UInt64
    public var offset: Int
    public var recordBytes: Int
    public var createdMicros: UInt64
    public var lastAccessMicros: UInt64

    /// Bytes the record occupies on disk, block padding included.
    public var diskBytes: Int { Block.roundUp(recordBytes) }
}

/// A page read back from disk and decoded: `data` holds `shape.layers` sections, each the keys
/// part then the values part, as 16-bit elements.
public struct DiskPage: Sendable {
    public var page: StoredPage
    public var data: PageBuffer
}

/// Why a read found nothing usable. Damage is a miss, never bytes.
public enum DiskMiss: Error, Equatable, Sendable, CustomStringConvertible {
    case notStored
    case damaged(String)
    case readFailed(StorageError)

    public var description: String {
        switch self {
        case .notStored: "page is not on disk"
        case .damaged(let why): "page record is damaged: \(why)"
        case .readFailed(let error): "page could not be read: \(error)"
        }
    }
}

public enum DiskTierError: Error, Equatable, CustomStringConvertible {
    case storage(StorageError)
    /// Writes are paused after a failure; the next retry of the disk is in `retryInMicros`.
    case writesSuspended(StorageError, retryInMicros: UInt64)
    case codec(CodecError)
    case format(FormatError)
    case invalidPage(String)
    /// The disk budget or the tenant's disk quota has no room that this write may make.
    case overBudget(String)
    case closed

    public var description: String {
        switch self {
        case .storage(let e): "disk tier: \(e)"
        case .writesSuspended(let e, let retry):
            "disk tier writes are paused after a failure (\(e)); retrying in \(retry / 1000) ms — memory tiers keep serving"
        case .codec(let e): "disk tier: \(e)"
        case .format(let e): "disk tier: \(e)"
        case .invalidPage(let why): "disk tier: invalid page: \(why)"
        case .overBudget(let why): why
        case .closed: "disk tier is closed"
        }
    }
}

/// What start-up recovery found and did.
public struct RecoveryReport: Sendable, Equatable, CustomStringConvertible {
    public var pages = 0
    public var segments = 0
    public var recordsScanned = 0
    public var indexBlocksLoaded = 0
    /// Bytes cut from segment tails (writes that never completed).
    public var truncatedBytes = 0
    /// Records found damaged in the middle of a segment.
    public var damagedRecords = 0
    /// Segment files no manifest entry names (left by a crash mid-rotation or mid-compaction).
    public var orphanSegmentsRemoved = 0
    /// The manifest was missing or damaged and was rebuilt from the segment files.
    public var manifestRebuilt = false
    public var elapsedMicros: UInt64 = 0

    public var description: String {
        "\(pages) pages in \(segments) segments (\(indexBlocksLoaded) index blocks, \(recordsScanned) records scanned), "
            + "\(truncatedBytes) torn bytes truncated, \(damagedRecords) damaged records, "
            + "\(orphanSegmentsRemoved) orphan segments removed\(manifestRebuilt ? ", manifest rebuilt" : "") in \(elapsedMicros / 1000) ms"
    }
}

/// Counters and gauges of the disk tier, for status and metrics.
public struct DiskTierStats: Sendable, Equatable {
    public var pages = 0
    public var liveBytes = 0
    public var fileBytes = 0
    public var segments = 0
    public var quarantinedSegments = 0
    public var reads = 0
    public var readMisses = 0
    public var checksumFailures = 0
    public var writes = 0
    public var writeFailures = 0
    public var groupCommits = 0
    public var compactions = 0
    public var evictions = 0
    public var writesSuspended = false
}
