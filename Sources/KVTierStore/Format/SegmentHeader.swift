import KVTierCore

/// How the records of one segment are written and checked: its format version and, from
/// version 2, the segment's secret record key (docs/format.md, "Segment header").
public struct SegmentFormat: Equatable, Sendable {
    public var version: UInt32
    /// Keys every record's authentication tag; nil in version 1 segments, which have none.
    public var recordKey: DigestKey?

    public init(version: UInt32, recordKey: DigestKey?) {
        self.version = version
        self.recordKey = recordKey
    }

    /// The format new segments are written in, with a fresh random key.
    public static func current() -> SegmentFormat { SegmentFormat(version: SegmentHeader.version, recordKey: .random()) }

    /// Version 1: records checked by CRC alone, so a reader must never look for one inside
    /// another (no resync after an invalid record).
    public static let legacy = SegmentFormat(version: 1, recordKey: nil)
}

/// Block 0 of every segment file (docs/format.md, "Segment header").
public struct SegmentHeader: Equatable, Sendable {
    public static let magic: UInt64 = 0x0100_4745_5354_564B  // "KVTSEG\0\1"
    /// Version 2 added the record key and authenticated record headers.
    public static let version: UInt32 = 2

    public var segmentID: UInt64
    public var storeID: PageKey
    public var createdMicros: UInt64
    public var format: SegmentFormat

    public init(segmentID: UInt64, storeID: PageKey, createdMicros: UInt64, format: SegmentFormat = .current()) {
        self.segmentID = segmentID
        self.storeID = storeID
        self.createdMicros = createdMicros
        self.format = format
    }

    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: Block.size)
        w.u64(Self.magic)
        w.u32(format.version)
        w.u32(UInt32(Block.size))
        w.u64(segmentID)
        w.key(storeID)
        w.u64(createdMicros)
        if let key = format.recordKey {
            w.u64(key.words.0)
            w.u64(key.words.1)
            w.u64(key.words.2)
            w.u64(key.words.3)
        }
        w.zeros(Block.size - 4 - w.count)
        w.u32(CRC32C.checksum(w.bytes))
        return w.bytes
    }

    public init(decoding bytes: UnsafeRawBufferPointer) throws(FormatError) {
        guard bytes.count >= Block.size else { throw .truncated("segment header") }
        var r = ByteReader(bytes)
        do {
            guard try r.u64() == Self.magic else { throw FormatError.badMagic("segment header") }
            let version = try r.u32()
            guard version == 1 || version == Self.version else { throw FormatError.unsupportedVersion("segment", version) }
            let blockSize = try r.u32()
            guard blockSize == UInt32(Block.size) else { throw FormatError.inconsistent("segment block size \(blockSize)") }
            segmentID = try r.u64()
            storeID = try r.key()
            createdMicros = try r.u64()
            if version == 1 {
                format = .legacy
            } else {
                let key = DigestKey(words: (try r.u64(), try r.u64(), try r.u64(), try r.u64()))
                format = SegmentFormat(version: version, recordKey: key)
            }
            var tail = ByteReader(bytes, offset: Block.size - 4)
            let stored = try tail.u32()
            let computed = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: bytes[0..<Block.size - 4]))
            guard stored == computed else { throw FormatError.checksumMismatch("segment header", stored: stored, computed: computed) }
        } catch let error as FormatError {
            throw error
        } catch {
            throw .truncated("segment header")
        }
    }

    public static func fileName(_ id: UInt64) -> String { "seg-\(PageKey.hex(id)).kvs" }

    public static func id(fromFileName name: String) -> UInt64? {
        guard name.hasPrefix("seg-"), name.hasSuffix(".kvs"), name.utf8.count == 24 else { return nil }
        return UInt64(name.dropFirst(4).dropLast(4), radix: 16)
    }
}
