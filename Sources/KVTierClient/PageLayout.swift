import KVTierCore

/// Conversion between the arrays a model produces, keys and values each
/// `[layers, tokens, kvHeads, headDim]`, and the page layout of docs/protocol.md ("Data layout"):
/// one section per layer, a section being the keys `[n, kvHeads, headDim]` of the page's `n`
/// tokens followed by the values of the same shape.
///
/// A `PUT` sends tokens `dataStart ..< count` cut at page boundaries (`chunkRanges`), each chunk
/// laid out as a page of its own token count (`pack`). A `GET` serves whole pages, the last of
/// which may hold more tokens than are served (`unpack` takes the rows it needs).
///
/// Sizes are preconditions: callers check buffers a peer described before handing them here.
public enum PageLayout {
    /// The token ranges of the chunks that carry tokens `dataStart ..< tokenCount`: the first
    /// from `dataStart` to the end of its page, then whole pages, then the rest. Empty when
    /// `dataStart == tokenCount`.
    public static func chunkRanges(dataStart: Int, tokenCount: Int, pageTokens: Int) -> [Range<Int>] {
        precondition(pageTokens > 0 && dataStart >= 0 && dataStart <= tokenCount, "chunk ranges out of order")
        var ranges: [Range<Int>] = []
        var start = dataStart
        while start < tokenCount {
            let pageEnd = (start / pageTokens + 1) * pageTokens
            let end = min(pageEnd, tokenCount)
            ranges.append(start..<end)
            start = end
        }
        return ranges
    }

    /// Bytes of a page (or chunk) of `tokens` tokens.
    public static func pageBytes(tokens: Int, shape: ModelShape) -> Int { shape.pageBytes(tokens: tokens) }

    /// Writes tokens `range` of a sequence of `sequenceTokens` tokens as a page of
    /// `range.count` tokens into the start of `destination`.
    /// - Precondition: `keys` and `values` hold `shape.elements(tokens: sequenceTokens)` 16-bit
    ///   elements each, `range` lies inside the sequence, and `destination` holds the page.
    public static func pack(
        shape: ModelShape, sequenceTokens: Int, range: Range<Int>,
        keys: UnsafeRawBufferPointer, values: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer
    ) {
        let arrayBytes = shape.elements(tokens: sequenceTokens) * ModelShape.elementBytes
        precondition(keys.count == arrayBytes && values.count == arrayBytes, "keys and values must be [layers, tokens, kvHeads, headDim]")
        precondition(range.lowerBound >= 0 && range.upperBound <= sequenceTokens, "token range outside the sequence")
        let row = shape.rowBytes
        let runBytes = range.count * row
        precondition(destination.count >= shape.layers * 2 * runBytes, "destination smaller than the page")
        guard runBytes > 0, let output = destination.baseAddress else { return }
        var at = 0
        for layer in 0..<shape.layers {
            let source = (layer * sequenceTokens + range.lowerBound) * row
            for part in [keys, values] {
                (output + at).copyMemory(from: part.baseAddress! + source, byteCount: runBytes)
                at += runBytes
            }
        }
    }

    /// Reads the first `usedTokens` tokens of a page holding `pageTokens` tokens into tokens
    /// `start ..< start + usedTokens` of keys and values arrays of `sequenceTokens` tokens.
    /// - Precondition: `page` holds `pageTokens` tokens, `usedTokens <= pageTokens`, the
    ///   destination range lies inside the sequence and both arrays have its shape.
    public static func unpack(
        shape: ModelShape, page: UnsafeRawBufferPointer, pageTokens: Int, usedTokens: Int,
        sequenceTokens: Int, start: Int, keys: UnsafeMutableRawBufferPointer, values: UnsafeMutableRawBufferPointer
    ) {
        let arrayBytes = shape.elements(tokens: sequenceTokens) * ModelShape.elementBytes
        precondition(keys.count == arrayBytes && values.count == arrayBytes, "keys and values must be [layers, tokens, kvHeads, headDim]")
        precondition(usedTokens >= 0 && usedTokens <= pageTokens, "a page cannot serve more tokens than it holds")
        precondition(start >= 0 && start + usedTokens <= sequenceTokens, "token range outside the sequence")
        precondition(page.count >= pageBytes(tokens: pageTokens, shape: shape), "page smaller than its token count")
        let row = shape.rowBytes
        let sectionRun = pageTokens * row
        let usedBytes = usedTokens * row
        guard usedBytes > 0, let input = page.baseAddress else { return }
        for layer in 0..<shape.layers {
            let target = (layer * sequenceTokens + start) * row
            let section = layer * 2 * sectionRun
            keys.baseAddress!.advanced(by: target).copyMemory(from: input + section, byteCount: usedBytes)
            values.baseAddress!.advanced(by: target).copyMemory(from: input + section + sectionRun, byteCount: usedBytes)
        }
    }

    /// `pack` into a new array (inline `PUT` bodies, tests).
    public static func pack(shape: ModelShape, sequenceTokens: Int, range: Range<Int>, keys: [UInt16], values: [UInt16]) -> [UInt8] {
        var page = [UInt8](repeating: 0, count: pageBytes(tokens: range.count, shape: shape))
        keys.withUnsafeBytes { keys in
            values.withUnsafeBytes { values in
                page.withUnsafeMutableBytes { pack(shape: shape, sequenceTokens: sequenceTokens, range: range, keys: keys, values: values, into: $0) }
            }
        }
        return page
    }

    /// `unpack` into arrays the caller owns.
    public static func unpack(
        shape: ModelShape, page: [UInt8], pageTokens: Int, usedTokens: Int,
        sequenceTokens: Int, start: Int, keys: inout [UInt16], values: inout [UInt16]
    ) {
        page.withUnsafeBytes { page in
            keys.withUnsafeMutableBytes { keys in
                values.withUnsafeMutableBytes { values in
                    unpack(shape: shape, page: page, pageTokens: pageTokens, usedTokens: usedTokens,
                           sequenceTokens: sequenceTokens, start: start, keys: keys, values: values)
                }
            }
        }
    }
}
