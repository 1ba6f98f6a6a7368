import KVTierCodec
import KVTierCore

/// KV-like test data: keys with per-channel offsets and a few outlier channels (as real post-RoPE
/// keys have), values near N(0, 1). Deterministic for a seed.
public enum SyntheticKV {
    public static func section(_ shape: SectionShape, seed: UInt64) -> (keys: [UInt16], values: [UInt16]) {
        var random = SplitMix64(seed: seed)
        let channels = shape.kvHeads * shape.headDim
        var offsets = [Float](repeating: 0, count: channels)
        var spreads = [Float](repeating: 1, count: channels)
        for c in 0..<channels {
            offsets[c] = random.nextGaussian() * 1.5
            spreads[c] = 0.5 + Float(random.next() % 1000) / 1000
            if random.next() % 16 == 0 { offsets[c] *= 6; spreads[c] *= 3 }  // outlier channels
        }
        var keys = [UInt16](repeating: 0, count: shape.elementsPerPart)
        var values = [UInt16](repeating: 0, count: shape.elementsPerPart)
        for i in 0..<shape.elementsPerPart {
            let c = i % channels
            keys[i] = shape.elementType.bits(from: offsets[c] + spreads[c] * random.nextGaussian())
            values[i] = shape.elementType.bits(from: random.nextGaussian())
        }
        return (keys, values)
    }
}
