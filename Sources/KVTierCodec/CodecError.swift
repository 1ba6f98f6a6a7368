/// Why a codec could not encode or decode a section. Every case says what to do about it.
public enum CodecError: Error, Equatable, CustomStringConvertible {
    /// The codec name is not one of `Codec.all` (see `kvtier codec list`).
    case unknownCodec(String)
    /// A numeric codec tag read from storage or the wire that this build does not know.
    case unknownTag(UInt32)
    /// The codec cannot handle this shape (e.g. `k4v4` needs headDim divisible by 32).
    case unsupportedShape(SectionShape, String)
    /// Quantizers need finite input; `count` elements of `part` were NaN or ±Inf.
    case nonFiniteInput(part: String, count: Int)
    /// A caller-provided buffer has the wrong size.
    case bufferSize(what: String, expected: Int, actual: Int)
    /// The encoded bytes end early or carry trailing bytes.
    case truncated(expected: Int, actual: Int)
    /// The encoded bytes are structurally invalid.
    case corrupt(String)
    /// The compression library failed for a reason other than bad input.
    case compressionFailed(String)

    public var description: String {
        switch self {
        case .unknownCodec(let name):
            "unknown codec '\(name)'; run 'kvtier codec list' for the valid names"
        case .unknownTag(let tag):
            "unknown codec tag 0x\(String(tag, radix: 16)); the data was written by a newer or foreign KVTier"
        case .unsupportedShape(let shape, let why):
            "codec cannot handle shape \(shape): \(why)"
        case .nonFiniteInput(let part, let count):
            "\(part) contain \(count) non-finite values (NaN or Inf); quantizing codecs need finite input, store such pages with 'fp16'"
        case .bufferSize(let what, let expected, let actual):
            "\(what) buffer holds \(actual) bytes but \(expected) are needed"
        case .truncated(let expected, let actual):
            "encoded section is \(actual) bytes but its shape and codec need \(expected): truncated or mismatched data"
        case .corrupt(let why):
            "encoded section is corrupt: \(why)"
        case .compressionFailed(let why):
            "compression failed: \(why)"
        }
    }
}
