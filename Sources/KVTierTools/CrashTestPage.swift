import KVTierCore
import KVTierStore

/// A page of the crash tests: address, shape and bytes follow from its number alone, so the
/// `kvtier debug crash-writer` process and the test that kills it need to share nothing but an
/// acknowledgement log.
public struct CrashTestPage: Sendable, Hashable {
    public static let tenant = TenantID(0xC4A5)
    public static let keyHigh: UInt64 = 0xC4A5_C4A5
    public static let modelID: UInt64 = 0xC4A5

    public let number: UInt64

    public init(number: UInt64) { self.number = number }

    /// The page whose address this is, if it is a crash-test page at all.
    public init?(address: PageAddress) {
        guard address.tenant == Self.tenant, address.key.high == Self.keyHigh else { return nil }
        number = address.key.low
    }

    public var address: PageAddress { PageAddress(tenant: Self.tenant, key: PageKey(high: Self.keyHigh, low: number)) }

    /// 1–4 layers of 16–512 tokens × 1 head × 32: 4 KiB to 256 KiB raw, so records cross block
    /// boundaries and a 1 MiB segment holds a handful to a few hundred.
    public var shape: PageShape {
        var random = SplitMix64(seed: number)
        let h = random.next()
        return PageShape(tokens: 16 + Int(h % 497), layers: 1 + Int((h >> 16) % 4), kvHeads: 1, headDim: 32)
    }

    /// The page's contents: finite float16 values (no NaN or infinity) that vary with the number.
    public var data: PageBuffer { TestPattern.finiteFloat16(bytes: shape.rawBytes, seed: number) }
}

/// Deterministic page contents for tests and tools.
public enum TestPattern {
    /// `bytes` bytes of float16 values with magnitudes between about 1e-4 and 16, never NaN or
    /// infinite (so every codec accepts them), different for every seed.
    public static func finiteFloat16(bytes: Int, seed: UInt64) -> PageBuffer {
        let buffer = PageBuffer(byteCount: bytes)
        var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        let elements = buffer.bytes.bindMemory(to: UInt16.self)
        for i in 0..<elements.count {
            state ^= state << 13
            state ^= state >> 7
            state ^= state << 17
            // Sign and mantissa from the state; exponent 0x0C...0x13.
            elements[i] = UInt16(truncatingIfNeeded: state) & 0x83FF | UInt16(0x3000 + (state >> 32) % 8 * 0x400)
        }
        return buffer
    }
}
