/// A codec: a quantizer followed by a lossless stage, named like `k4v4`, `k4v4+zstd`,
/// `fp16+lz4` or `fp16+zstd(3)`.
public struct Codec: Hashable, Sendable, CustomStringConvertible {
    public var quantizer: Quantizer
    public var lossless: LosslessStage

    public init(_ quantizer: Quantizer, _ lossless: LosslessStage = .none) {
        self.quantizer = quantizer
        self.lossless = lossless
    }

    /// Parses a codec name; throws `CodecError.unknownCodec` naming the bad part.
    public init(name: String) throws(CodecError) {
        let parts = name.split(separator: "+", maxSplits: 1, omittingEmptySubsequences: false)
        guard let quantizer = Quantizer(name: String(parts[0])) else { throw .unknownCodec(name) }
        var lossless = LosslessStage.none
        if parts.count == 2 {
            guard let stage = LosslessStage(name: String(parts[1])), stage != .none else {
                throw .unknownCodec(name)
            }
            lossless = stage
        }
        self.init(quantizer, lossless)
    }

    public var name: String {
        lossless == .none ? quantizer.name : "\(quantizer.name)+\(lossless.name)"
    }

    public var description: String { name }

    /// Stable numeric tag stored in page records and frames: bits 0-7 the quantizer, bits 8-23
    /// the lossless stage (see `LosslessStage.tag`).
    public var tag: UInt32 { UInt32(quantizer.rawValue) | UInt32(lossless.tag) << 8 }

    public init(tag: UInt32) throws(CodecError) {
        guard tag >> 24 == 0,
              let quantizer = Quantizer(rawValue: UInt8(tag & 0xFF)),
              let lossless = LosslessStage(tag: UInt16(tag >> 8 & 0xFFFF))
        else { throw .unknownTag(tag) }
        self.init(quantizer, lossless)
    }

    /// Every codec with the default lossless levels, in a stable order: each quantizer alone,
    /// then with LZ4, then with Zstd.
    public static var all: [Codec] {
        Quantizer.allCases.flatMap { q in
            [Codec(q), Codec(q, .lz4), Codec(q, .zstd(level: LosslessStage.defaultZstdLevel))]
        }
    }

    /// Whether decoding returns the input bits exactly.
    public var isLossless: Bool { quantizer.isLossless }
}
