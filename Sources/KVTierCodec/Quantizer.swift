/// The lossy (or identity) first stage of a codec. Tags are stable: they are written into page
/// records and wire frames. Byte layouts: docs/codec-layouts.md.
public enum Quantizer: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    /// No quantization: the 16-bit elements as given.
    case fp16 = 1
    /// int8 per token and head, symmetric, fp16 scale.
    case q8 = 2
    /// KIVI-style 4-bit: keys per channel over 32-token groups, values per token over 32 channels.
    case k4v4 = 3
    /// Random-sign Hadamard rotation + 4-bit Lloyd–Max codebook + fp16 scale per vector.
    case tq4 = 4
    /// As `tq4` with a 3-bit codebook.
    case tq3 = 5
    /// The aggressive codec: each page's per-channel mean (fp16) is subtracted from keys and
    /// values, then the residual is coded as `tq3`. 3.1875 bits/element at 128 × 256.
    case tq3m = 6
    /// The sub-3-bit codec: per page, the first token kept as given, channel means removed from
    /// keys and values, keys 3-bit and values 2.5-bit (half the rotated coordinates 3-bit, half
    /// 2-bit), one log-scale byte per vector. 2.93 bits/element at 128 × 256, 2.99 at 64 × 256.
    case tq3s = 7
    /// As `tq3s` with keys 2.5-bit and values 2-bit: 2.43 bits/element at 128 × 256, 2.49 at 64.
    case tq2s = 8

    public var name: String {
        switch self {
        case .fp16: "fp16"
        case .q8: "q8"
        case .k4v4: "k4v4"
        case .tq4: "tq4"
        case .tq3: "tq3"
        case .tq3m: "tq3m"
        case .tq3s: "tq3s"
        case .tq2s: "tq2s"
        }
    }

    public var description: String { name }

    public init?(name: String) {
        guard let match = Self.allCases.first(where: { $0.name == name.lowercased() }) else { return nil }
        self = match
    }

    /// True when decoding gives back the input bits exactly.
    public var isLossless: Bool { self == .fp16 }

    /// One sentence for `kvtier codec list`.
    public var summary: String {
        switch self {
        case .fp16: "no quantization (16-bit elements as given)"
        case .q8: "int8 per token and head, fp16 scale"
        case .k4v4: "KIVI 4-bit: keys per channel over 32 tokens, values per token over 32 channels"
        case .tq4: "random-sign Hadamard rotation, 4-bit Lloyd-Max codebook, fp16 scale per vector"
        case .tq3: "random-sign Hadamard rotation, 3-bit Lloyd-Max codebook, fp16 scale per vector"
        case .tq3m: "per-page channel means removed, then tq3 (aggressive, near-4-bit quality)"
        case .tq3s: "first token kept, channel means removed, keys 3-bit / values 2.5-bit rotated, log8 scales"
        case .tq2s: "first token kept, channel means removed, keys 2.5-bit / values 2-bit rotated, log8 scales"
        }
    }

    /// The head dimensions this quantizer accepts, in words.
    public var headDimRule: String {
        switch self {
        case .fp16, .q8: "any"
        case .k4v4: "multiple of 32"
        case .tq4, .tq3, .tq3m, .tq3s, .tq2s: "power of 2, 32-256"
        }
    }

    /// Throws unless this quantizer can encode sections of `shape`.
    public func check(_ shape: SectionShape) throws(CodecError) {
        try shape.validate()
        let d = shape.headDim
        switch self {
        case .fp16, .q8:
            return
        case .k4v4:
            guard d % 32 == 0 else { throw .unsupportedShape(shape, "k4v4 needs headDim divisible by 32") }
        case .tq4, .tq3, .tq3m, .tq3s, .tq2s:
            guard d >= 32, d <= 256, d & (d - 1) == 0 else {
                throw .unsupportedShape(shape, "\(name) needs headDim a power of two from 32 to 256")
            }
        }
    }

    /// Exact bytes of the keys part and of the values part for `shape` (no lossless stage).
    public func partSizes(_ shape: SectionShape) -> (keys: Int, values: Int) {
        let t = shape.tokens, h = shape.kvHeads, d = shape.headDim
        switch self {
        case .fp16:
            return (t * h * d * 2, t * h * d * 2)
        case .q8:
            return (t * h * (d + 2), t * h * (d + 2))
        case .k4v4:
            let groups = (t + 31) / 32
            return (groups * h * d * 4 + t * h * d / 2, t * h * (d / 32) * 20)
        case .tq4:
            return (t * h * (2 + d / 2), t * h * (2 + d / 2))
        case .tq3:
            return (t * h * (2 + d * 3 / 8), t * h * (2 + d * 3 / 8))
        case .tq3m:
            let part = h * d * 2 + t * h * (2 + d * 3 / 8)
            return (part, part)
        case .tq3s, .tq2s:
            let layout = MixedTQLayout(self)!
            return (layout.keys.bytes(shape, exactTokens: layout.exactTokens),
                    layout.values.bytes(shape, exactTokens: layout.exactTokens))
        }
    }

    /// Exact bytes of a whole quantized section.
    public func sectionSize(_ shape: SectionShape) -> Int {
        let parts = partSizes(shape)
        return parts.keys + parts.values
    }

    /// Stored bits per element for `shape`, scales and minimums included.
    public func bitsPerElement(_ shape: SectionShape) -> Double {
        Double(sectionSize(shape) * 8) / Double(shape.elements)
    }
}
