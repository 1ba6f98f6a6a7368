/// The lossless second stage of a codec, applied to the quantized section. Float data (the
/// `fp16` quantizer) is byte-plane shuffled first, which is what lets LZ4/Zstd find anything.
public enum LosslessStage: Hashable, Sendable, CustomStringConvertible {
    case none
    case lz4
    /// Zstandard at `level` (1...19).
    case zstd(level: Int)

    public static let defaultZstdLevel = 1
    public static let zstdLevels = 1...19

    /// Stable tag: bits 0-7 the stage, bits 8-15 its level.
    public var tag: UInt16 {
        switch self {
        case .none: 0
        case .lz4: 1
        case .zstd(let level): 2 | UInt16(level) << 8
        }
    }

    public init?(tag: UInt16) {
        switch tag & 0xFF {
        case 0 where tag == 0: self = .none
        case 1 where tag == 1: self = .lz4
        case 2:
            let level = Int(tag >> 8)
            guard Self.zstdLevels.contains(level) else { return nil }
            self = .zstd(level: level)
        default: return nil
        }
    }

    /// `""`, `"lz4"`, `"zstd"` (default level) or `"zstd(N)"`.
    public var name: String {
        switch self {
        case .none: ""
        case .lz4: "lz4"
        case .zstd(let level) where level == Self.defaultZstdLevel: "zstd"
        case .zstd(let level): "zstd(\(level))"
        }
    }

    public var description: String { self == .none ? "none" : name }

    /// Accepts `none`, `lz4`, `zstd`, `zstd(N)`, `zstdN` and `zstd-N`.
    public init?(name: String) {
        let text = name.lowercased()
        switch text {
        case "", "none": self = .none; return
        case "lz4": self = .lz4; return
        case "zstd": self = .zstd(level: Self.defaultZstdLevel); return
        default: break
        }
        guard text.hasPrefix("zstd") else { return nil }
        var digits = text.dropFirst(4)
        if digits.first == "(" && digits.last == ")" {
            digits = digits.dropFirst().dropLast()
        } else if digits.first == "-" {
            digits = digits.dropFirst()
        }
        guard let level = Int(digits), Self.zstdLevels.contains(level) else { return nil }
        self = .zstd(level: level)
    }
}
