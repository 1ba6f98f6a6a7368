import KVTierCodec
import KVTierCore

/// Keys with per-channel offsets and outlier channels, values near N(0, 1), as 16-bit patterns.
func kvSection(_ shape: SectionShape, seed: UInt64) -> (keys: [UInt16], values: [UInt16]) {
    var random = SplitMix64(seed: seed)
    let channels = shape.kvHeads * shape.headDim
    let offsets = (0..<channels).map { _ in random.nextGaussian() * 2 * (random.next() % 16 == 0 ? 5 : 1) }
    var keys = [UInt16](), values = [UInt16]()
    for i in 0..<shape.elementsPerPart {
        keys.append(shape.elementType.bits(from: offsets[i % channels] + random.nextGaussian()))
        values.append(shape.elementType.bits(from: random.nextGaussian()))
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
