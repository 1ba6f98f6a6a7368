import KVTierCore

/// One record as the index of a sealed segment lists it: its header and where it starts.
public struct IndexEntry: Equatable, Sendable {
    public var header: RecordHeader
    /// Offset of the record in the segment, in blocks.
    public var block: UInt32

    public init(_ header: RecordHeader, offset: Int) {
        self.header = header
        self.block = UInt32(offset / Block.size)
    }

    public var offset: Int { Int(block) * Block.size }
}

/// The list of records appended when a segment is sealed (docs/format.md, "Index block").
public enum IndexBlock {
    public static let magic: UInt64 = 0x0100_5844_4954_564B  // "KVTIDX\0\1"
    public static let entryBytes = 8 + RecordHeader.size
    public static let headerBytes = 16

    public static func encode(_ entries: [IndexEntry]) -> [UInt8] {
        var body = ByteWriter(capacity: entries.count * entryBytes)
        for e in entries {
            body.u32(e.block)
            body.u32(0)
            e.header.encode(into: &body)
        }
        var w = ByteWriter(capacity: Block.roundUp(headerBytes + body.count))
        w.u64(magic)
        w.u32(UInt32(entries.count))
        w.u32(CRC32C.checksum(body.bytes))
        w.raw(body.bytes)
        w.zeros(Block.roundUp(w.count) - w.count)
        return w.bytes
    }

    /// Unpadded length of an index block with `count` entries.
    public static func length(entries count: Int) -> Int { headerBytes + count * entryBytes }

    public static func decode(_ bytes: UnsafeRawBufferPointer) throws(FormatError) -> [IndexEntry] {
        var r = ByteReader(bytes)
        do {
            guard try r.u64() == magic else { throw FormatError.badMagic("index block") }
            let count = Int(try r.u32())
            let stored = try r.u32()
            guard count <= (bytes.count - headerBytes) / entryBytes else { throw FormatError.truncated("index block") }
            let body = UnsafeRawBufferPointer(rebasing: bytes[headerBytes..<headerBytes + count * entryBytes])
            let computed = CRC32C.checksum(body)
            guard stored == computed else { throw FormatError.checksumMismatch("index block", stored: stored, computed: computed) }
            var entries: [IndexEntry] = []
            entries.reserveCapacity(count)
            for i in 0..<count {
                let at = headerBytes + i * entryBytes
                let block = UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: at, as: UInt32.self))
                let header = try RecordHeader(decoding: UnsafeRawBufferPointer(rebasing: bytes[at + 8..<at + entryBytes]))
                entries.append(IndexEntry(header, offset: Int(block) * Block.size))
            }
            return entries
        } catch let error as FormatError {
            throw error
        } catch {
            throw .truncated("index block")
        }
    }
}
