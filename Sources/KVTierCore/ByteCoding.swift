/// Appends little-endian fixed-width fields to a byte array: the one way KVTier writes its binary
/// layouts (page records, manifests, index blocks, wire frames).
public struct ByteWriter {
    public private(set) var bytes: [UInt8]

    public init(capacity: Int = 0) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    public var count: Int { bytes.count }

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func key(_ k: PageKey) { u64(k.high); u64(k.low) }
    public mutating func raw(_ data: some Sequence<UInt8>) { bytes.append(contentsOf: data) }
    public mutating func zeros(_ n: Int) { bytes.append(contentsOf: repeatElement(0, count: n)) }

    /// Overwrites 4 bytes at `offset` (for checksums computed after the fact).
    public mutating func patchU32(_ v: UInt32, at offset: Int) {
        withUnsafeBytes(of: v.littleEndian) { for i in 0..<4 { bytes[offset + i] = $0[i] } }
    }
}

/// Reads little-endian fixed-width fields with bounds checks: running past the end throws
/// instead of reading memory it was not given. For parsing untrusted bytes.
public struct ByteReader {
    public struct OutOfBounds: Error, Equatable, CustomStringConvertible {
        public var offset: Int
        public var wanted: Int
        public var available: Int
        public init(offset: Int, wanted: Int, available: Int) {
            self.offset = offset
            self.wanted = wanted
            self.available = available
        }

        public var description: String { "needed \(wanted) bytes at offset \(offset) but only \(available) remain" }
    }

    private let base: UnsafeRawBufferPointer
    public private(set) var offset: Int

    public init(_ bytes: UnsafeRawBufferPointer, offset: Int = 0) {
        base = bytes
        self.offset = offset
    }

    public var remaining: Int { base.count - offset }

    private mutating func take(_ n: Int) throws(OutOfBounds) -> Int {
        guard n >= 0, offset <= base.count, n <= base.count - offset else {
            throw OutOfBounds(offset: offset, wanted: n, available: max(0, base.count - offset))
        }
        defer { offset += n }
        return offset
    }

    public mutating func u8() throws(OutOfBounds) -> UInt8 { base[try take(1)] }
    public mutating func u16() throws(OutOfBounds) -> UInt16 {
        UInt16(littleEndian: base.loadUnaligned(fromByteOffset: try take(2), as: UInt16.self))
    }
    public mutating func u32() throws(OutOfBounds) -> UInt32 {
        UInt32(littleEndian: base.loadUnaligned(fromByteOffset: try take(4), as: UInt32.self))
    }
    public mutating func u64() throws(OutOfBounds) -> UInt64 {
        UInt64(littleEndian: base.loadUnaligned(fromByteOffset: try take(8), as: UInt64.self))
    }
    public mutating func key() throws(OutOfBounds) -> PageKey {
        let high = try u64()
        return PageKey(high: high, low: try u64())
    }
    public mutating func skip(_ n: Int) throws(OutOfBounds) { _ = try take(n) }
    public mutating func bytes(_ n: Int) throws(OutOfBounds) -> UnsafeRawBufferPointer {
        let start = try take(n)
        return UnsafeRawBufferPointer(rebasing: base[start..<start + n])
    }
}
