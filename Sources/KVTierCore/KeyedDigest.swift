import CKVTierKernels

/// A secret key for `KeyedDigest`: 32 random bytes.
public struct DigestKey: Equatable, Hashable, Sendable {
    public var words: (UInt64, UInt64, UInt64, UInt64)

    public init(words: (UInt64, UInt64, UInt64, UInt64)) { self.words = words }

    /// A fresh key from the system's random source.
    public static func random() -> DigestKey {
        var generator = SystemRandomNumberGenerator()
        return DigestKey(words: (generator.next(), generator.next(), generator.next(), generator.next()))
    }

    public static func == (a: DigestKey, b: DigestKey) -> Bool { a.words == b.words }
    public func hash(into hasher: inout Hasher) {
        hasher.combine(words.0)
        hasher.combine(words.1)
        hasher.combine(words.2)
        hasher.combine(words.3)
    }
}

/// A 64-bit message authentication code: BLAKE2b-64 over the key then the message. BLAKE2b has no
/// length extension (its last block is finalized with a flag), so a secret prefix is a sound MAC;
/// it is what makes a record on disk something only the daemon can have written.
public enum KeyedDigest {
    public static func tag(key: DigestKey, _ message: UnsafeRawBufferPointer) -> UInt64 {
        var state = kvt_blake2b_state()
        kvt_blake2b_init(&state, 8)
        var prefix = (key.words.0.littleEndian, key.words.1.littleEndian, key.words.2.littleEndian, key.words.3.littleEndian)
        withUnsafeBytes(of: &prefix) { kvt_blake2b_update(&state, $0.baseAddress, $0.count) }
        kvt_blake2b_update(&state, message.baseAddress, message.count)
        var digest: UInt64 = 0
        withUnsafeMutableBytes(of: &digest) { kvt_blake2b_final(&state, $0.baseAddress!.assumingMemoryBound(to: UInt8.self)) }
        return UInt64(littleEndian: digest)
    }
}

extension KeyedDigest {
    /// Bytes of `mac`.
    public static let macBytes = 32

    /// A 256-bit message authentication code: BLAKE2b-256 over the key then each of `parts` in
    /// order (as if concatenated), written into `out` (`macBytes` long). For bytes that leave the
    /// host (the remote tier): 64 bits suit records on the daemon's own disk, but a value in a
    /// shared store can be attacked offline.
    public static func mac(key: DigestKey, _ parts: [UnsafeRawBufferPointer], into out: UnsafeMutableRawBufferPointer) {
        precondition(out.count >= macBytes, "a MAC needs \(macBytes) bytes")
        var state = kvt_blake2b_state()
        kvt_blake2b_init(&state, macBytes)
        var prefix = (key.words.0.littleEndian, key.words.1.littleEndian, key.words.2.littleEndian, key.words.3.littleEndian)
        withUnsafeBytes(of: &prefix) { kvt_blake2b_update(&state, $0.baseAddress, $0.count) }
        for part in parts where part.count > 0 { kvt_blake2b_update(&state, part.baseAddress, part.count) }
        kvt_blake2b_final(&state, out.baseAddress!.assumingMemoryBound(to: UInt8.self))
    }

    /// Whether two MACs are equal, in time that does not depend on where they differ.
    public static func macsEqual(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer) -> Bool {
        guard a.count == b.count else { return false }
        var difference: UInt8 = 0
        for i in 0..<a.count { difference |= a[i] ^ b[i] }
        return difference == 0
    }
}

extension DigestKey {
    /// A key from exactly 32 bytes (four little-endian words); nil for another length.
    public init?(bytes: [UInt8]) {
        guard bytes.count == 32 else { return nil }
        func word(_ i: Int) -> UInt64 { bytes[i * 8..<i * 8 + 8].reversed().reduce(0) { $0 << 8 | UInt64($1) } }
        self.init(words: (word(0), word(1), word(2), word(3)))
    }
}
