import KVTierCore

/// Applies records in write order to find the live pages: the one rule, shared by start-up
/// recovery and `kvtier verify`/`kvtier pages` (docs/format.md, "Recovery", step 4), so the
/// inspector can never list a page the daemon treats as deleted, or the reverse.
public enum RecordReplay {
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

    /// Replays `entries` (any order; sorted by sequence here) into `live`, each live record made
    /// by `make` (recovery builds its index entries straight away: no second dictionary).
    /// Returns one more than the highest sequence seen, damaged records included.
    ///
    /// Later page records replace earlier ones; a tombstone deletes the record it names and any
    /// older one (an older record can outlive a compacted newer one); a damaged page record
    /// deletes the older ones too, since serving one would be serving stale bytes as current.
    public static func replay<Live>(_ entries: [Entry], into live: inout [PageAddress: Live],
                                    sequence: (Live) -> UInt64, make: (Entry) -> Live) -> UInt64 {
        var next: UInt64 = 1
        live.reserveCapacity(entries.count)
        for entry in entries.sorted(by: { $0.header.sequence < $1.header.sequence }) {
            let h = entry.header
            next = max(next, h.sequence &+ 1)
            switch h.kind {
            case .page:
                live[h.address] = entry.damaged ? nil : make(entry)
            case .tombstone:
                if let current = live[h.address], sequence(current) <= h.deletesSequence { live[h.address] = nil }
            }
        }
        return next
    }

    /// The live record of every page.
    public static func live(_ entries: [Entry]) -> [PageAddress: Entry] {
        var live: [PageAddress: Entry] = [:]
        _ = replay(entries, into: &live, sequence: { $0.header.sequence }, make: { $0 })
        return live
    }
}
