import KVTierCodec
import KVTierCore

/// A model as the store knows it: the shape of its KV cache. `id` is the protocol's fingerprint
/// (KVTierProtocol.ModelFingerprint), computed by whoever registers the model.
public struct ModelSpec: Hashable, Sendable {
    public var id: UInt64
    public var name: String
    public var shape: ModelShape
    public var pageTokens: Int
    /// The RoPE base it was registered with (part of the fingerprint; kept so a registration can
    /// be repeated elsewhere, as `kvtier import` does).
    public var ropeTheta: Float
    /// The codec its pages are written to disk with, chosen at registration (part of the
    /// fingerprint); nil: the store's configured `diskCodec`, whatever it is when a page is written.
    public var diskCodec: Codec?

    public init(id: UInt64, name: String, shape: ModelShape, pageTokens: Int, ropeTheta: Float = 0, diskCodec: Codec? = nil) {
        self.id = id
        self.name = name
        self.shape = shape
        self.pageTokens = pageTokens
        self.ropeTheta = ropeTheta
        self.diskCodec = diskCodec
    }

    public init(id: UInt64, name: String, layers: Int, kvHeads: Int, headDim: Int, elementType: ElementType, pageTokens: Int,
                ropeTheta: Float = 0, diskCodec: Codec? = nil) {
        self.init(id: id, name: name, shape: ModelShape(layers: layers, kvHeads: kvHeads, headDim: headDim, elementType: elementType),
                  pageTokens: pageTokens, ropeTheta: ropeTheta, diskCodec: diskCodec)
    }

    // The shape's fields, forwarded: the store's request paths read them by these names.
    public var layers: Int { shape.layers }
    public var kvHeads: Int { shape.kvHeads }
    public var headDim: Int { shape.headDim }
    public var elementType: ElementType { shape.elementType }

    /// The shape of a page holding `tokens` tokens.
    public func pageShape(tokens: Int) -> PageShape { PageShape(tokens: tokens, model: shape) }

    /// Bytes of one token's keys and values over all layers.
    public var bytesPerToken: Int { shape.bytesPerToken }

    /// A model name: the same rule as a session's (`Name.validate`): names are kept in the
    /// catalog, listed by `MODELS` and printed by `kvtier`.
    public static func validate(name: String) throws(StoreError) {
        try Name.validate(name, kind: "model")
    }

    /// 255: the longest model name, as for sessions.
    public static let maxNameBytes = Name.maxBytes
}

/// The rule for names clients give (sessions, models): 1 to `maxBytes` bytes of UTF-8 without
/// control characters, since names appear in logs, tables and the file names of exports.
enum Name {
    static let maxBytes = 255

    static func validate(_ name: String, kind: String) throws(StoreError) {
        let bytes = name.utf8.count
        guard bytes >= 1, bytes <= maxBytes else {
            throw .invalidArgument("\(kind) name is \(bytes) bytes; use 1 to \(maxBytes) bytes of UTF-8")
        }
        guard !name.unicodeScalars.contains(where: { $0.properties.generalCategory == .control }) else {
            throw .invalidArgument("\(kind) name '\(name.debugDescription)' contains control characters; use printable text")
        }
    }
}

/// Why the tiered store refused a request; each maps to a wire error code.
public enum StoreError: Error, Equatable, CustomStringConvertible {
    case unknownModel(UInt64)
    case invalidArgument(String)
    case notFound(String)
    case overBudget(String)
    case unavailable(String)

    public var description: String {
        switch self {
        case .unknownModel(let id): "model 0x\(String(id, radix: 16)) is not registered: send REGISTER_MODEL first"
        case .invalidArgument(let why): why
        case .notFound(let why): why
        case .overBudget(let why): why
        case .unavailable(let why): why
        }
    }
}
