import KVTierCore

/// Walks the records of a segment file in order, verifying each: the one reader of segment
/// files, shared by start-up recovery, index rebuilds and `kvtier verify`.
///
/// Version 2 segments: a record header counts only when its tag (keyed by the segment's secret)
/// checks, so a header is a proven record start and its length is trusted to find the next one,
/// even when its payload is damaged; after a header that does not check, the scan tries the next
/// block boundaries, where only a header the daemon wrote can pass — bytes a client chose (a
/// page's payload) never do. Each header also names the segment's acknowledged end when it was
/// written: damage below the highest such end is corruption, damage above it a torn write.
/// Version 1 segments have no tags: the scan stops at the first invalid record and never looks
/// for records after it (they could be a client's bytes inside a torn record).
public struct SegmentScanner {
    public struct Record: Sendable {
        public var header: RecordHeader
        public var offset: Int

        public init(header: RecordHeader, offset: Int) {
            self.header = header
            self.offset = offset
        }
    }

    public struct Damage: Sendable, CustomStringConvertible {
        public var offset: Int
        /// Where the damaged stretch ends: the next record start found, or where the scan ended.
        public var end: Int
        public var error: FormatError
        /// The header of a damaged record whose header itself checks (version 2): the page it
        /// held is known to be lost, so an older record of that page must not come back.
        public var header: RecordHeader?
        public var description: String { "offset \(offset): \(error)" }
    }

    public struct Result: Sendable {
        public var segmentHeader: SegmentHeader?
        /// Valid records before `validEnd`.
        public var records: [Record] = []
        /// Damage below the acknowledged end: records that were durable and are now unreadable.
        public var damaged: [Damage] = []
        /// Where the kept part of the segment ends (block aligned); after it is the torn tail.
        public var validEnd: Int = Block.size
        /// Bytes after `validEnd`: the last group's write that never completed (never acknowledged).
        public var tailBytes: Int = 0
        /// The highest acknowledged end the records claim (or the caller knew, e.g. a sealed length).
        public var acknowledgedEnd: Int = 0
        public var fileBytes: Int = 0
    }

    /// Records are never larger than this; a header claiming more is damage.
    public static let maxRecordBytes = 1 << 31

    let file: any StorageFile

    public init(file: any StorageFile) {
        self.file = file
    }

    /// Scans from block 1 up to `limit` (the file size when nil). `acknowledged`: bytes known to
    /// have been durable whatever the records say (a sealed segment's length). The segment header
    /// is checked first; a bad header makes the whole file unreadable and is damage at 0.
    public func scan(limit: Int? = nil, acknowledged: Int = 0) throws(StorageError) -> Result {
        var result = Result()
        let size: Int
        if let limit { size = limit } else { size = try file.size() }
        result.fileBytes = size
        let block = PageBuffer(byteCount: Block.size)
        guard try file.read(into: block.bytes, at: 0) == Block.size else {
            result.damaged.append(Damage(offset: 0, end: size, error: .truncated("segment header")))
            result.validEnd = 0
            result.tailBytes = size
            return result
        }
        let format: SegmentFormat
        do {
            let header = try SegmentHeader(decoding: block.readOnly)
            result.segmentHeader = header
            format = header.format
        } catch {
            result.damaged.append(Damage(offset: 0, end: size, error: error))
            result.validEnd = 0
            result.tailBytes = size
            return result
        }
        var acknowledgedEnd = acknowledged
        var records: [Record] = []
        var damage: [Damage] = []
        var offset = Block.size
        var end = Block.size
        scanning: while offset + RecordHeader.size <= size {
            switch try readRecord(at: offset, fileSize: size, format: format, scratch: block) {
            case .valid(let header):
                acknowledgedEnd = max(acknowledgedEnd, Int(header.acknowledgedBlocks) * Block.size)
                records.append(Record(header: header, offset: offset))
                offset += header.paddedBytes
                end = offset
            case .damaged(let header, let error):
                acknowledgedEnd = max(acknowledgedEnd, Int(header.acknowledgedBlocks) * Block.size)
                let next = min(offset + header.paddedBytes, Block.roundUp(size))
                damage.append(Damage(offset: offset, end: next, error: error, header: header))
                offset = next
                end = offset
            case .invalid(let error):
                if format.recordKey == nil {
                    // Version 1: nothing after an invalid record can be proven a record start.
                    damage.append(Damage(offset: offset, end: Block.roundUp(size), error: error))
                    break scanning
                }
                if let last = damage.last, last.header == nil, last.end == offset {
                    damage[damage.count - 1].end = offset + Block.size
                } else {
                    damage.append(Damage(offset: offset, end: offset + Block.size, error: error))
                }
                offset += Block.size
            case .indexBlock(let bytes):
                // Not part of what is kept: in a segment the manifest does not call sealed (a
                // crash between writing it and the manifest), recovery cuts it with the tail and
                // appends after the last record; sealing writes a new one.
                offset += bytes
            }
        }
        if size < acknowledgedEnd {
            damage.append(Damage(offset: size, end: acknowledgedEnd,
                                 error: .truncated("segment: records up to offset \(acknowledgedEnd) were acknowledged")))
        }
        // The torn tail starts at the first damage at or above the acknowledged end: it is the
        // last group, whose write never completed; everything after it belongs to that group too.
        let tailStart = damage.first { $0.offset >= acknowledgedEnd && $0.offset < size }?.offset
        result.validEnd = tailStart ?? max(end, min(Block.roundUp(acknowledgedEnd), size / Block.size * Block.size))
        result.records = records.filter { $0.offset < result.validEnd }
        result.damaged = damage.filter { $0.offset < result.validEnd || $0.offset >= size }
        for i in result.damaged.indices where result.damaged[i].offset < result.validEnd {
            result.damaged[i].end = min(result.damaged[i].end, result.validEnd)
        }
        result.acknowledgedEnd = acknowledgedEnd
        result.tailBytes = max(0, size - result.validEnd)
        return result
    }

    enum Outcome {
        case valid(RecordHeader)
        /// An authentic header (version 2) whose record does not check: known extent, lost bytes.
        case damaged(RecordHeader, FormatError)
        case invalid(FormatError)
        /// A sealed segment's index block: skipped over, it lists what the scan finds anyway.
        case indexBlock(Int)
    }

    func readRecord(at offset: Int, fileSize: Int, format: SegmentFormat, scratch: PageBuffer) throws(StorageError) -> Outcome {
        let got = try file.read(into: scratch.bytes, at: offset)
        let view = UnsafeRawBufferPointer(rebasing: scratch.readOnly[0..<got])
        if got >= 8, view.loadUnaligned(as: UInt64.self) == IndexBlock.magic.littleEndian, got >= IndexBlock.headerBytes {
            let count = Int(UInt32(littleEndian: view.loadUnaligned(fromByteOffset: 8, as: UInt32.self)))
            let length = Block.roundUp(IndexBlock.length(entries: count))
            // An index block is always the last thing in a segment.
            if offset + length == Block.roundUp(fileSize) || offset + length == fileSize { return .indexBlock(length) }
        }
        let header: RecordHeader
        do {
            header = try PageRecord.authenticate(view, format: format)
        } catch {
            return .invalid(error)
        }
        let authentic = format.recordKey != nil
        guard header.recordBytes <= Self.maxRecordBytes, offset + header.recordBytes <= fileSize else {
            let error = FormatError.truncated("record at offset \(offset)")
            return authentic ? .damaged(header, error) : .invalid(error)
        }
        if header.recordBytes <= got {
            do { try PageRecord.verifyPayload(view, header) } catch { return authentic ? .damaged(header, error) : .invalid(error) }
            return .valid(header)
        }
        let whole = PageBuffer(byteCount: header.recordBytes)
        guard try file.read(into: whole.bytes, at: offset) == header.recordBytes else {
            let error = FormatError.truncated("record at offset \(offset)")
            return authentic ? .damaged(header, error) : .invalid(error)
        }
        do {
            try PageRecord.verifyPayload(UnsafeRawBufferPointer(rebasing: whole.readOnly[0..<header.recordBytes]), header)
        } catch {
            return authentic ? .damaged(header, error) : .invalid(error)
        }
        return .valid(header)
    }
}
