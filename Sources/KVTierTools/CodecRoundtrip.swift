import KVTierCodec
import KVTierCore

/// Encodes a whole `[T, H, D]` keys/values pair page by page, decodes it again, and reports
/// what it cost: the engine behind `kvtier codec roundtrip` and the quality harness.
public struct CodecRoundtrip {
    public struct Report: Codable, Sendable, Equatable {
        public var codec: String
        public var tokens: Int
        public var kvHeads: Int
        public var headDim: Int
        public var pageTokens: Int
        public var pages: Int
        public var elements: Int
        /// Every byte the codec produced for all pages: codes, scales, minimums, frames.
        public var encodedBytes: Int
        /// `encodedBytes * 8 / elements`.
        public var bitsPerElement: Double
        /// ‖K̂ − K‖ / ‖K‖ over the whole array (Frobenius norms).
        public var keysRelativeError: Double
        public var valuesRelativeError: Double
    }

    public var codec: Codec
    public var pageTokens: Int
    public var elementType: ElementType

    public init(codec: Codec, pageTokens: Int = Limits.defaultPageTokens, elementType: ElementType = .float16) {
        self.codec = codec
        self.pageTokens = pageTokens
        self.elementType = elementType
    }

    /// Round-trips `keys` and `values` (both `[T, H, D]`) and returns the decoded arrays, and
    /// with `keepEncoded` every page's encoded section in page order (otherwise empty): what the
    /// quality tests compare byte for byte with the NumPy reference.
    public func run(keys: NumPyArray, values: NumPyArray, keepEncoded: Bool = false) throws
        -> (keys: NumPyArray, values: NumPyArray, report: Report, encoded: [UInt8])
    {
        guard keys.shape.count == 3 else {
            throw ToolError("keys have shape \(keys.shape); expected [tokens, kvHeads, headDim]")
        }
        guard keys.shape == values.shape else {
            throw ToolError("keys have shape \(keys.shape) but values have \(values.shape); they must match")
        }
        guard pageTokens >= 1, pageTokens <= Limits.maxPageTokens else {
            throw ToolError("page tokens must be 1...\(Limits.maxPageTokens), got \(pageTokens)")
        }
        let (t, h, d) = (keys.shape[0], keys.shape[1], keys.shape[2])
        guard t >= 1 else { throw ToolError("arrays hold no tokens") }
        let section = SectionCodec(codec)
        var outKeys = [UInt16](repeating: 0, count: keys.elements.count)
        var outValues = [UInt16](repeating: 0, count: values.elements.count)
        var encodedBytes = 0
        var encoded: [UInt8] = []
        var pages = 0
        let rowElements = h * d
        var buffer = [UInt8](repeating: 0, count: section.maxEncodedSize(
            SectionShape(tokens: min(pageTokens, t), kvHeads: h, headDim: d, elementType: elementType)))
        for start in stride(from: 0, to: t, by: pageTokens) {
            let count = min(pageTokens, t - start)
            let shape = SectionShape(tokens: count, kvHeads: h, headDim: d, elementType: elementType)
            let range = start * rowElements..<(start + count) * rowElements
            let written = try keys.elements.withUnsafeBytes { k in
                try values.elements.withUnsafeBytes { v in
                    try buffer.withUnsafeMutableBytes { out in
                        try section.encode(
                            keys: UnsafeRawBufferPointer(rebasing: k[range.lowerBound * 2..<range.upperBound * 2]),
                            values: UnsafeRawBufferPointer(rebasing: v[range.lowerBound * 2..<range.upperBound * 2]),
                            shape: shape, into: out)
                    }
                }
            }
            try buffer.withUnsafeBytes { encoded in
                try outKeys.withUnsafeMutableBytes { k in
                    try outValues.withUnsafeMutableBytes { v in
                        try section.decode(
                            UnsafeRawBufferPointer(rebasing: encoded[0..<written]), shape: shape,
                            keys: UnsafeMutableRawBufferPointer(rebasing: k[range.lowerBound * 2..<range.upperBound * 2]),
                            values: UnsafeMutableRawBufferPointer(rebasing: v[range.lowerBound * 2..<range.upperBound * 2]))
                    }
                }
            }
            encodedBytes += written
            if keepEncoded { encoded += buffer[0..<written] }
            pages += 1
        }
        let elements = 2 * keys.elements.count
        let report = Report(
            codec: codec.name, tokens: t, kvHeads: h, headDim: d, pageTokens: pageTokens, pages: pages,
            elements: elements, encodedBytes: encodedBytes,
            bitsPerElement: Double(encodedBytes * 8) / Double(elements),
            keysRelativeError: relativeError(keys.elements, outKeys),
            valuesRelativeError: relativeError(values.elements, outValues))
        return (NumPyArray(shape: keys.shape, elements: outKeys), NumPyArray(shape: values.shape, elements: outValues),
                report, encoded)
    }

    private func relativeError(_ reference: [UInt16], _ decoded: [UInt16]) -> Double {
        var difference = 0.0
        var norm = 0.0
        for (a, b) in zip(reference, decoded) {
            let x = Double(elementType.float(fromBits: a))
            let y = Double(elementType.float(fromBits: b))
            difference += (x - y) * (x - y)
            norm += x * x
        }
        return norm > 0 ? (difference / norm).squareRoot() : (difference > 0 ? .infinity : 0)
    }
}
