import KVTierClient
import KVTierCore
import Testing

@Suite struct PageLayoutTests {
    @Test func chunkRangesCutAtPageBoundaries() {
        #expect(PageLayout.chunkRanges(dataStart: 0, tokenCount: 40, pageTokens: 16) == [0..<16, 16..<32, 32..<40])
        #expect(PageLayout.chunkRanges(dataStart: 5, tokenCount: 40, pageTokens: 16) == [5..<16, 16..<32, 32..<40])
        #expect(PageLayout.chunkRanges(dataStart: 16, tokenCount: 32, pageTokens: 16) == [16..<32])
        #expect(PageLayout.chunkRanges(dataStart: 20, tokenCount: 25, pageTokens: 16) == [20..<25])
        #expect(PageLayout.chunkRanges(dataStart: 40, tokenCount: 40, pageTokens: 16) == [])
    }

    /// The layout of docs/protocol.md spelled out element by element: for each layer, the keys of
    /// the chunk's tokens, then their values.
    @Test func packMatchesTheSpecifiedLayout() {
        let shape = ModelShape(layers: 2, kvHeads: 1, headDim: 2)
        let tokens = 3
        // Element (l, t, d) of keys is 100*l + 10*t + d, of values 1000 more.
        var keys: [UInt16] = []
        for l in 0..<2 { for t in 0..<tokens { for d in 0..<2 { keys.append(UInt16(100 * l + 10 * t + d)) } } }
        let values = keys.map { $0 + 1000 }
        let page = PageLayout.pack(shape: shape, sequenceTokens: tokens, range: 1..<3, keys: keys, values: values)
        let elements = stride(from: 0, to: page.count, by: 2).map { UInt16(page[$0]) | UInt16(page[$0 + 1]) << 8 }
        #expect(elements == [10, 11, 20, 21, 1010, 1011, 1020, 1021, 110, 111, 120, 121, 1110, 1111, 1120, 1121])
    }

    /// Random shapes and sequences: cut at a random dataStart (often inside a page), pack every
    /// chunk, unpack them back in place; the tokens from dataStart on come back exactly and the
    /// ones before stay untouched. Also a GET-like read of whole pages cut short by maxTokens.
    @Test func roundTripThroughChunks() {
        let seed = testSeed("PageLayoutTests.roundTripThroughChunks")
        var random = SplitMix64(seed: seed)
        var partialFirstChunks = 0
        var partialLastChunks = 0
        for round in 0..<200 {
            let shape = ModelShape(layers: Int.random(in: 1...4, using: &random), kvHeads: Int.random(in: 1...3, using: &random),
                                headDim: Int.random(in: 1...8, using: &random))
            let pageTokens = Int.random(in: 1...9, using: &random)
            let tokens = Int.random(in: 1...40, using: &random)
            let dataStart = Int.random(in: 0...tokens, using: &random)
            let count = shape.elements(tokens: tokens)
            let keys = (0..<count).map { _ in UInt16.random(in: 0...UInt16.max, using: &random) }
            let values = (0..<count).map { _ in UInt16.random(in: 0...UInt16.max, using: &random) }

            let ranges = PageLayout.chunkRanges(dataStart: dataStart, tokenCount: tokens, pageTokens: pageTokens)
            #expect(ranges.map(\.count).reduce(0, +) == tokens - dataStart, "round \(round), seed \(seed)")
            if let first = ranges.first, first.lowerBound % pageTokens != 0 { partialFirstChunks += 1 }
            if let last = ranges.last, last.count < pageTokens, last.lowerBound % pageTokens == 0 { partialLastChunks += 1 }
            var gotKeys = [UInt16](repeating: 0xDEAD, count: count)
            var gotValues = [UInt16](repeating: 0xDEAD, count: count)
            for range in ranges {
                #expect(range.count <= pageTokens && range.lowerBound / pageTokens == (range.upperBound - 1) / pageTokens)
                let page = PageLayout.pack(shape: shape, sequenceTokens: tokens, range: range, keys: keys, values: values)
                #expect(page.count == range.count * shape.bytesPerToken)
                PageLayout.unpack(shape: shape, page: page, pageTokens: range.count, usedTokens: range.count, sequenceTokens: tokens,
                                  start: range.lowerBound, keys: &gotKeys, values: &gotValues)
            }
            for layer in 0..<shape.layers {
                let row = shape.rowElements
                for token in 0..<tokens {
                    let at = (layer * tokens + token) * row
                    let expectedKeys = token >= dataStart ? Array(keys[at..<at + row]) : [UInt16](repeating: 0xDEAD, count: row)
                    let expectedValues = token >= dataStart ? Array(values[at..<at + row]) : [UInt16](repeating: 0xDEAD, count: row)
                    guard Array(gotKeys[at..<at + row]) == expectedKeys, Array(gotValues[at..<at + row]) == expectedValues else {
                        Issue.record("round \(round), seed \(seed): layer \(layer) token \(token) differs")
                        return
                    }
                }
            }

            // Whole pages from token 0, read back only up to `served` tokens (a GET's maxTokens).
            let served = Int.random(in: 0...tokens, using: &random)
            var servedKeys = [UInt16](repeating: 0, count: shape.elements(tokens: served))
            var servedValues = servedKeys
            for page in PageLayout.chunkRanges(dataStart: 0, tokenCount: tokens, pageTokens: pageTokens) where page.lowerBound < served {
                let bytes = PageLayout.pack(shape: shape, sequenceTokens: tokens, range: page, keys: keys, values: values)
                PageLayout.unpack(shape: shape, page: bytes, pageTokens: page.count, usedTokens: min(page.upperBound, served) - page.lowerBound,
                                  sequenceTokens: served, start: page.lowerBound, keys: &servedKeys, values: &servedValues)
            }
            #expect(servedKeys == prefix(keys, shape: shape, tokens: tokens, served: served), "round \(round), seed \(seed)")
            #expect(servedValues == prefix(values, shape: shape, tokens: tokens, served: served), "round \(round), seed \(seed)")
        }
        #expect(partialFirstChunks > 20 && partialLastChunks > 20, "the rounds must cover partial first and last chunks")
    }
}

/// The first `served` tokens of every layer of a `[layers, tokens, kvHeads, headDim]` array.
func prefix(_ array: [UInt16], shape: ModelShape, tokens: Int, served: Int) -> [UInt16] {
    var result: [UInt16] = []
    for layer in 0..<shape.layers {
        let start = layer * tokens * shape.rowElements
        result += array[start..<start + served * shape.rowElements]
    }
    return result
}
