import KVTierCore

/// Walks the records of a segment file in order, verifying each: the shared engine of start-up
/// recovery, index rebuilds and `kvtier verify`.
public struct SegmentScanner {
    public struct Record: Sendable {
        public var header: RecordHeader
        public var offset: Int
    }

    public struct Damage: Sendable, CustomStringConvertible {
        public var offset: Int
        public var error: FormatError
        public var description: String { "offset \(offset): \(error)" }
    }

    public struct Result: Sendable {
        public var segmentHeader: SegmentHeader?
        public var records: [Record] = []
        /// Invalid records followed by valid ones: damage, not a torn write.
        public var damaged: [Damage] = []
        /// Where the last valid record ends (block aligned); everything after it is a torn tail.
        public var validEnd: Int = Block.size
        /// Bytes after `validEnd` (a torn or never-completed write).
        public var tailBytes: Int = 0
        public var fileBytes: Int = 0
    }

    /// Records are never larger than this; a header claiming more is damage.
    public static let maxRecordBytes = 1 << 31

    let file: any StorageFile

    public init(file: any StorageFile) {
        self.file = file
    }

    /// Scans from block 1 up to `limit` (the file size when nil). The segment header is checked
    /// first; a bad header makes the whole file unreadable and is reported as damage at 0.
    public func scan(limit: Int? = nil) throws(StorageError) -> Result {
        var result = Result()
        let size: Int
        if let limit { size = limit } else { size = try file.size() }
        result.fileBytes = size
        let block = PageBuffer(byteCount: Block.size)
        guard try file.read(into: block.bytes, at: 0) == Block.size else {
            result.damaged.append(Damage(offset: 0, error: .truncated("segment header")))
            result.validEnd = 0
            result.tailBytes = size
            return result
        }
        do {
            result.segmentHeader = try SegmentHeader(decoding: block.readOnly)
        } catch {
            result.damaged.append(Damage(offset: 0, error: error))
            result.validEnd = 0
            result.tailBytes = size
            return result
        }
        var offset = Block.size
        var pendingDamage: [Damage] = []
        while offset + RecordHeader.size <= size {
            switch try readRecord(at: offset, fileSize: size, scratch: block) {
            case .valid(let header):
                result.damaged += pendingDamage
                pendingDamage.removeAll()
                result.records.append(Record(header: header, offset: offset))
                offset += header.paddedBytes
                result.validEnd = offset
            case .invalid(let error):
                if pendingDamage.count < 64 {
                    pendingDamage.append(Damage(offset: offset, error: error))
                }
                offset += Block.size
            case .indexBlock(let bytes):
                offset += bytes
            }
        }
        // Damage with no valid record after it is the torn tail of the last write.
        result.tailBytes = size - result.validEnd
        return result
    }

    enum Outcome {
        case valid(RecordHeader)
        case invalid(FormatError)
        /// A sealed segment's index block: skipped over, it lists what the scan finds anyway.
        case indexBlock(Int)
    }

    func readRecord(at offset: Int, fileSize: Int, scratch: PageBuffer) throws(StorageError) -> Outcome {
        let got = try file.read(into: scratch.bytes, at: offset)
        let view = UnsafeRawBufferPointer(rebasing: scratch.readOnly[0..<got])
        if got >= 8, view.loadUnaligned(as: UInt64.self) == IndexBlock.magic.littleEndian, got >= IndexBlock.headerBytes {
            let count = Int(UInt32(littleEndian: view.loadUnaligned(fromByteOffset: 8, as: UInt32.self)))
            let length = Block.roundUp(IndexBlock.length(entries: count))
            if offset + length <= fileSize { return .indexBlock(length) }
        }
        let header: RecordHeader
        do {
            header = try RecordHeader(decoding: view)
        } catch {
            return .invalid(error)
        }
        guard header.recordBytes <= Self.maxRecordBytes, offset + header.recordBytes <= fileSize else {
            return .invalid(.truncated("record at offset \(offset)"))
        }
        if header.recordBytes <= got {
            do { return .valid(try PageRecord.verify(view)) } catch { return .invalid(error) }
        }
        let whole = PageBuffer(byteCount: header.recordBytes)
        guard try file.read(into: whole.bytes, at: offset) == header.recordBytes else {
            return .invalid(.truncated("record at offset \(offset)"))
        }
        do {
            return .valid(try PageRecord.verify(UnsafeRawBufferPointer(rebasing: whole.readOnly[0..<header.recordBytes])))
        } catch {
            return .invalid(error)
        }
    }
}
