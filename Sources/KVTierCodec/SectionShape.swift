import KVTierCore

/// The shape of one section: the keys and the values of one layer of one page, each
/// `[tokens, kvHeads, headDim]` row-major.
public struct SectionShape: Hashable, Sendable, CustomStringConvertible {
    public var tokens: Int
    public var kvHeads: Int
    public var headDim: Int
    public var elementType: ElementType

    public init(tokens: Int, kvHeads: Int, headDim: Int, elementType: ElementType = .float16) {
        self.tokens = tokens
        self.kvHeads = kvHeads
        self.headDim = headDim
        self.elementType = elementType
    }

    /// Elements in the keys part (the values part has as many).
    public var elementsPerPart: Int { tokens * kvHeads * headDim }
    /// Bytes of the keys part as 16-bit elements.
    public var bytesPerPart: Int { elementsPerPart * elementType.byteWidth }
    /// Elements of keys and values together.
    public var elements: Int { 2 * elementsPerPart }
    /// Bytes of keys and values together as 16-bit elements (the "fp16 bytes" of benchmarks).
    public var rawBytes: Int { 2 * bytesPerPart }
    /// Vectors (one per token and head) in each part.
    public var vectorsPerPart: Int { tokens * kvHeads }

    public var description: String { "[\(tokens), \(kvHeads), \(headDim)] \(elementType)" }

    /// Checks the shape against `Limits`; codec-specific demands are checked by the codec.
    public func validate() throws(CodecError) {
        guard tokens >= 1, tokens <= Limits.maxPageTokens else {
            throw .unsupportedShape(self, "tokens must be 1...\(Limits.maxPageTokens)")
        }
        guard kvHeads >= 1, kvHeads <= Limits.maxKVHeads else {
            throw .unsupportedShape(self, "kvHeads must be 1...\(Limits.maxKVHeads)")
        }
        guard headDim >= 1, headDim <= Limits.maxHeadDim else {
            throw .unsupportedShape(self, "headDim must be 1...\(Limits.maxHeadDim)")
        }
        guard rawBytes <= Limits.maxSectionBytes else {
            throw .unsupportedShape(self, "a section may hold at most \(ByteCount(Limits.maxSectionBytes)) of 16-bit data")
        }
    }
}
