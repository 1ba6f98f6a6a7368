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
