import KVTierCore

/// The live segment list (docs/format.md, "Manifest").
public struct Manifest: Equatable, Sendable {
    public enum SegmentState: UInt32, Sendable {
        case active = 1
        case sealed = 2
        case quarantined = 3
    }

    public struct Segment: Equatable, Sendable {
        public var id: UInt64
        public var state: SegmentState
        public var indexOffset: Int
        public var indexBytes: Int
        public var sealedBytes: Int

        public init(id: UInt64, state: SegmentState, indexOffset: Int = 0, indexBytes: Int = 0, sealedBytes: Int = 0) {
            self.id = id
            self.state = state
            self.indexOffset = indexOffset
            self.indexBytes = indexBytes
            self.sealedBytes = sealedBytes
        }
    }

    public static let magic: UInt64 = 0x0100_4E41_4D54_564B  // "KVTMAN\0\1"
    public static let version: UInt32 = 1
    public static let fileName = "MANIFEST"

    public var epoch: UInt64
    public var storeID: PageKey
    public var nextSegmentID: UInt64
    public var segments: [Segment]

    public init(epoch: UInt64, storeID: PageKey, nextSegmentID: UInt64, segments: [Segment]) {
        self.epoch = epoch
        self.storeID = storeID
        self.nextSegmentID = nextSegmentID
        self.segments = segments
    }

    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: 52 + 40 * segments.count)
        w.u64(Self.magic)
        w.u32(Self.version)
        w.u32(UInt32(segments.count))
        w.u64(epoch)
        w.key(storeID)
        w.u64(nextSegmentID)
        for s in segments {
            w.u64(s.id)
            w.u32(s.state.rawValue)
            w.u32(0)
            w.u64(UInt64(s.indexOffset))
            w.u64(UInt64(s.indexBytes))
            w.u64(UInt64(s.sealedBytes))
        }
        w.u32(CRC32C.checksum(w.bytes))
        return w.bytes
    }

    public init(decoding bytes: UnsafeRawBufferPointer) throws(FormatError) {
        var r = ByteReader(bytes)
        do {
            guard try r.u64() == Self.magic else { throw FormatError.badMagic("manifest") }
            let version = try r.u32()
            guard version == Self.version else { throw FormatError.unsupportedVersion("manifest", version) }
            let count = Int(try r.u32())
            guard bytes.count == 52 + 40 * count else { throw FormatError.truncated("manifest") }
            var tail = ByteReader(bytes, offset: bytes.count - 4)
            let stored = try tail.u32()
            let computed = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: bytes[0..<bytes.count - 4]))
            guard stored == computed else { throw FormatError.checksumMismatch("manifest", stored: stored, computed: computed) }
            epoch = try r.u64()
            storeID = try r.key()
            nextSegmentID = try r.u64()
            segments = []
            for _ in 0..<count {
                let id = try r.u64()
                guard let state = SegmentState(rawValue: try r.u32()) else { throw FormatError.inconsistent("unknown segment state") }
                try r.skip(4)
                let indexOffset = Int(try r.u64()), indexBytes = Int(try r.u64()), sealed = Int(try r.u64())
                segments.append(Segment(id: id, state: state, indexOffset: indexOffset, indexBytes: indexBytes, sealedBytes: sealed))
            }
        } catch let error as FormatError {
            throw error
        } catch {
            throw .truncated("manifest")
        }
    }
}
