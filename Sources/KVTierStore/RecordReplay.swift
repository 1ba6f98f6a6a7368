import KVTierCore

/// Applies records in write order to find the live pages: the one rule, shared by start-up
/// recovery and `kvtier verify`/`kvtier pages` (docs/format.md, "Recovery", step 4), so the
/// inspector can never list a page the daemon treats as deleted, or the reverse.
public struct RecordReplay {
    public struct Entry: Sendable {
        public var header: RecordHeader
        public var segment: UInt64
        public var offset: Int
        /// The record's header checks but its bytes do not: the page it held is lost.
        public var damaged: Bool

        public init(header: RecordHeader, segment: UInt64, offset: Int, damaged: Bool = false) {
            self.header = header
            self.segment = segment
            self.offset = offset
            self.damaged = damaged
        }
    }

    /// The live record of every page.
    public private(set) var live: [PageAddress: Entry] = [:]
    /// One more than the highest sequence seen (damaged records included): the next write's.
    public private(set) var nextSequence: UInt64 = 1

    public init() {}

    /// Replays `entries` (any order; they are sorted by sequence here).
    public static func replay(_ entries: [Entry]) -> RecordReplay {
        var replay = RecordReplay()
        replay.live.reserveCapacity(entries.count)
        for entry in entries.sorted(by: { $0.header.sequence < $1.header.sequence }) { replay.apply(entry) }
        return replay
    }

    /// Later page records replace earlier ones; a tombstone deletes the record it names and any
    /// older one (an older record can outlive a compacted newer one); a damaged page record
    /// deletes the older ones too, since serving one would be serving stale bytes as current.
    public mutating func apply(_ entry: Entry) {
        let h = entry.header
        nextSequence = max(nextSequence, h.sequence &+ 1)
        switch h.kind {
        case .page:
            live[h.address] = entry.damaged ? nil : entry
        case .tombstone:
            if let current = live[h.address], current.header.sequence <= h.deletesSequence { live[h.address] = nil }
        }
    }
}
