import KVTierCore
import KVTierProtocol

/// Why a client call failed.
public enum KVTierClientError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The daemon answered with an error: its code (nil when newer than this build) and its
    /// message, which says what was wrong and what to do.
    case server(WireError?, String)
    /// The socket could not be reached, or broke (errno text included). The connection is
    /// unusable afterwards; connect again.
    case connection(String)
    /// The daemon sent something the protocol does not allow; the connection was dropped.
    case protocolViolation(String)
    /// The call's arguments cannot be sent (wrong buffer sizes, over a protocol limit).
    case invalidArgument(String)

    /// The daemon's error code, for `.server`.
    public var wireError: WireError? {
        if case .server(let code, _) = self { return code }
        return nil
    }

    public var description: String {
        switch self {
        case .server(let code, let message): "kvtierd: \(code.map { "\($0)" } ?? "error"): \(message)"
        case .connection(let message): "connection: \(message)"
        case .protocolViolation(let message): "protocol violation: \(message)"
        case .invalidArgument(let message): "invalid argument: \(message)"
        }
    }
}

/// A model as `REGISTER_MODEL` sends it: its KV shape and how the daemon keeps its pages.
@dynamicMemberLookup
public struct ModelSpecification: Sendable, Hashable {
    public var name: String
    public var shape: ModelShape
    /// Tokens per page; 0 asks for the daemon's default (256).
    public var pageTokens: Int
    public var ropeTheta: Float
    /// The codec the daemon writes this model's pages to disk with, e.g. `fp16` to keep every
    /// bit, `k4v4` or `tq3m+zstd(3)` to save space (docs/codecs.md); empty: the daemon's
    /// configured `diskCodec`. Part of the model id: the same shape with another codec is
    /// another model. The daemon checks the name (`invalidArgument` lists the valid ones).
    public var diskCodec: String

    public init(name: String, shape: ModelShape, pageTokens: Int = 0, ropeTheta: Float, diskCodec: String = "") {
        self.name = name
        self.shape = shape
        self.pageTokens = pageTokens
        self.ropeTheta = ropeTheta
        self.diskCodec = diskCodec
    }

    public init(name: String, layers: Int, kvHeads: Int, headDim: Int, elementType: ElementType,
                pageTokens: Int = 0, ropeTheta: Float, diskCodec: String = "") {
        self.init(name: name, shape: ModelShape(layers: layers, kvHeads: kvHeads, headDim: headDim, elementType: elementType),
                  pageTokens: pageTokens, ropeTheta: ropeTheta, diskCodec: diskCodec)
    }

    /// The shape's fields and sizes (`layers`, `kvHeads`, `bytesPerToken`, …), read and
    /// written through `shape`.
    public subscript<Value>(dynamicMember field: WritableKeyPath<ModelShape, Value>) -> Value {
        get { shape[keyPath: field] }
        set { shape[keyPath: field] = newValue }
    }
}

/// A model the daemon knows: the id every page call names, and the page size in force.
/// Registration is idempotent, so a client may also keep these across connections.
public struct RegisteredModel: Sendable, Hashable {
    public var modelID: UInt64
    public var specification: ModelSpecification
    /// Tokens per page in force (never 0).
    public var pageTokens: Int

    public init(modelID: UInt64, specification: ModelSpecification, pageTokens: Int) {
        self.modelID = modelID
        self.specification = specification
        self.pageTokens = pageTokens
    }

    public var shape: ModelShape { specification.shape }
}

/// The answer of `LOOKUP`: the longest cached prefix and how it splits over the tiers.
public struct LookupResult: Sendable, Hashable {
    public var cachedTokens: Int
    public var ramTokens: Int
    public var diskTokens: Int
    /// The daemon's estimate of the time to serve the prefix.
    public var estimatedLoadMicros: UInt64
    /// Leading tokens of the prefix whose pages are all resident in one VRAM pool of the tenant
    /// (docs/vram-tier.md); at most `cachedTokens`, apart from the RAM/disk split.
    public var vramTokens: Int

    public init(cachedTokens: Int, ramTokens: Int, diskTokens: Int, estimatedLoadMicros: UInt64, vramTokens: Int = 0) {
        self.cachedTokens = cachedTokens
        self.ramTokens = ramTokens
        self.diskTokens = diskTokens
        self.estimatedLoadMicros = estimatedLoadMicros
        self.vramTokens = vramTokens
    }
}

/// KV served by `get`, copied out of the daemon's pages: keys and values each
/// `[layers, tokens, kvHeads, headDim]` 16-bit elements (bit patterns of the model's type).
public struct CachedKV: Sendable, Equatable {
    /// Tokens served: a prefix of the request.
    public var tokens: Int
    public var keys: [UInt16]
    public var values: [UInt16]
}

/// One page lent by `withLeasedPages`, in the page layout (docs/protocol.md, "Data layout").
public struct LeasedPage {
    /// The page's bytes: `holdsTokens` tokens laid out as a page. Read-only, valid only inside
    /// the `withLeasedPages` body.
    public var bytes: UnsafeRawBufferPointer
    /// Tokens the page's layout holds.
    public var holdsTokens: Int
    /// The request's tokens this page serves: its first `servedTokens.count` tokens.
    public var servedTokens: Range<Int>
    /// Where the page lies in the tenant's arena (for clients that map or register the arena
    /// themselves); nil for inline pages.
    public var arenaOffset: Int?
}

/// The pages a `GET` leased, lent without copying.
public struct LeasedPages {
    /// Tokens served: a prefix of the request.
    public var tokens: Int
    public var pages: [LeasedPage]
    public var shape: ModelShape
}

/// A session: a named sequence of the tenant, with its TTL and pin.
public typealias KVTierSessionInfo = SessionInfo
