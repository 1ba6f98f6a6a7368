#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import KVTierCodec
import KVTierCore

/// Deterministic KV-like data for codec tests; every test that uses it says its seed.
struct TestRandom {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func gaussian() -> Float {
        let u1 = Float(next() >> 40) / Float(1 << 24) + 1e-7
        let u2 = Float(next() >> 40) / Float(1 << 24)
        return (-2 * logf(u1)).squareRoot() * cosf(2 * .pi * u2)
    }
}

/// Keys with per-channel offsets and outlier channels, values near N(0, 1), as 16-bit patterns.
func kvSection(_ shape: SectionShape, seed: UInt64) -> (keys: [UInt16], values: [UInt16]) {
    var random = TestRandom(seed: seed)
    let channels = shape.kvHeads * shape.headDim
    let offsets = (0..<channels).map { _ in random.gaussian() * 2 * (random.next() % 16 == 0 ? 5 : 1) }
    var keys = [UInt16](), values = [UInt16]()
    for i in 0..<shape.elementsPerPart {
        keys.append(shape.elementType.bits(from: offsets[i % channels] + random.gaussian()))
        values.append(shape.elementType.bits(from: random.gaussian()))
    }
    return (keys, values)
}

func floats(_ bits: [UInt16], _ type: ElementType) -> [Float] { bits.map { type.float(fromBits: $0) } }

func relativeError(_ reference: [Float], _ decoded: [Float]) -> Double {
    var difference = 0.0, norm = 0.0
    for (a, b) in zip(reference, decoded) {
        difference += Double(a - b) * Double(a - b)
        norm += Double(a) * Double(a)
    }
    return (difference / norm).squareRoot()
}

/// Runs `body` once per kernel level this CPU has, restoring the best level afterwards.
func forEachKernelLevel(_ body: (KernelLevel) throws -> Void) rethrows {
    defer { KernelLevel.force(.best) }
    for level in KernelLevel.allCases where level <= KernelLevel.best {
        KernelLevel.force(level)
        try body(level)
    }
}
