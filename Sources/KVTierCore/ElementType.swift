/// The element type of a KV tensor as the model produced it.
///
/// Both are 16 bits wide; codecs widen them exactly to Float32, and decoders round back to the
/// same type with round-to-nearest-even.
public enum ElementType: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    case float16 = 1
    case bfloat16 = 2

    public var byteWidth: Int { 2 }

    /// The name used on the command line, in NumPy and in the Python client.
    public var description: String {
        switch self {
        case .float16: "float16"
        case .bfloat16: "bfloat16"
        }
    }

    public init?(name: String) {
        switch name.lowercased() {
        case "float16", "fp16", "f16", "half": self = .float16
        case "bfloat16", "bf16": self = .bfloat16
        default: return nil
        }
    }
}

extension ElementType {
    /// The exact Float32 value of a 16-bit element.
    @inlinable
    public func float(fromBits bits: UInt16) -> Float {
        switch self {
        case .float16: Float(Float16(bitPattern: bits))
        case .bfloat16: Float(bitPattern: UInt32(bits) << 16)
        }
    }

    /// `value` rounded to this type, round to nearest even (NaN stays NaN).
    @inlinable
    public func bits(from value: Float) -> UInt16 {
        switch self {
        case .float16:
            return Float16(value).bitPattern
        case .bfloat16:
            let raw = value.bitPattern
            if value.isNaN { return UInt16(raw >> 16) | 0x0040 }
            let rounded = raw &+ 0x7FFF &+ ((raw >> 16) & 1)
            return UInt16(rounded >> 16)
        }
    }

    /// Whether a 16-bit pattern is NaN or ±Inf in this type.
    @inlinable
    public func isNonFinite(bits: UInt16) -> Bool {
        switch self {
        case .float16: bits & 0x7C00 == 0x7C00
        case .bfloat16: bits & 0x7F80 == 0x7F80
        }
    }
}
