/// The shape of a model's KV cache, named once for the store (`ModelSpec`, `PageShape`), the
/// Swift client (`ModelSpecification`, `PageLayout`) and the wire (`RegisterModel.shape`): per
/// token, `layers` sections of keys then values, each `[kvHeads, headDim]` elements of
/// `elementType`.
public struct ModelShape: Hashable, Sendable, CustomStringConvertible {
    public var layers: Int
    public var kvHeads: Int
    public var headDim: Int
    public var elementType: ElementType

    public init(layers: Int, kvHeads: Int, headDim: Int, elementType: ElementType = .float16) {
        self.layers = layers
        self.kvHeads = kvHeads
        self.headDim = headDim
        self.elementType = elementType
    }

    /// Bytes of one element: both element types are 16 bits wide.
    public static let elementBytes = 2

    /// Elements of one token's keys (or values) in one layer.
    public var rowElements: Int { kvHeads * headDim }
    /// Bytes of one token's keys (or values) in one layer.
    public var rowBytes: Int { rowElements * Self.elementBytes }
    /// Bytes of one token's keys and values over all layers.
    public var bytesPerToken: Int { layers * 2 * rowBytes }
    /// Bytes of one layer's section (keys then values) of `tokens` tokens.
    public func sectionBytes(tokens: Int) -> Int { 2 * tokens * rowBytes }
    /// Bytes of a page (or chunk) of `tokens` tokens: every layer's section.
    public func pageBytes(tokens: Int) -> Int { tokens * bytesPerToken }
    /// Elements of a `[layers, tokens, kvHeads, headDim]` keys (or values) array.
    public func elements(tokens: Int) -> Int { layers * tokens * rowElements }

    /// What is out of range (`Limits.maxLayers`, `maxKVHeads`, `maxHeadDim`), as a message that
    /// names the allowed range; nil when the shape is within every limit.
    public var limitViolation: String? {
        for (name, value, limit) in [("layers", layers, Limits.maxLayers), ("kvHeads", kvHeads, Limits.maxKVHeads),
                                     ("headDim", headDim, Limits.maxHeadDim)] where !(1...limit).contains(value) {
            return "\(name) is \(value); use 1...\(limit)"
        }
        return nil
    }

    public var description: String { "\(layers)×[\(kvHeads), \(headDim)] \(elementType)" }
}
