import CKVTierKernels
import KVTierCodec
import KVTierCore
import Testing

/// Every SIMD path against the scalar reference of docs/codec-layouts.md.
@Suite(.serialized) struct KernelConformanceTests {
    static let shapes: [SectionShape] = [
        SectionShape(tokens: 1, kvHeads: 1, headDim: 32),
        SectionShape(tokens: 31, kvHeads: 2, headDim: 64),
        SectionShape(tokens: 33, kvHeads: 3, headDim: 128),
        SectionShape(tokens: 64, kvHeads: 2, headDim: 128, elementType: .bfloat16),
        SectionShape(tokens: 255, kvHeads: 1, headDim: 256),
        SectionShape(tokens: 40, kvHeads: 2, headDim: 96),
    ]

    @Test(arguments: shapes)
    func k4v4MatchesReferenceBitForBit(shape: SectionShape) throws {
        let seed = UInt64(shape.tokens * 7919 + shape.headDim)
        let (keys, values) = kvSection(shape, seed: seed)
        let (t, h, d) = (shape.tokens, shape.kvHeads, shape.headDim)
        let fk = floats(keys, shape.elementType), fv = floats(values, shape.elementType)
        let expected = ScalarReference.k4v4EncodeKeys(fk, t: t, h: h, d: d) + ScalarReference.k4v4EncodeValues(fv, t: t, h: h, d: d)
        let expectedKeys = ScalarReference.k4v4DecodeKeys(expected, t: t, h: h, d: d).map { shape.elementType.bits(from: $0) }
        let valuesPart = Array(expected[Quantizer.k4v4.partSizes(shape).keys...])
        let expectedValues = ScalarReference.k4v4DecodeValues(valuesPart, t: t, h: h, d: d).map { shape.elementType.bits(from: $0) }
        try forEachKernelLevel { level in
            let codec = SectionCodec(Codec(.k4v4))
            let encoded = try codec.encode(keys: keys, values: values, shape: shape)
            #expect(encoded == expected, "k4v4 encode differs from the reference at level \(level), seed \(seed)")
            let decoded = try codec.decode(expected, shape: shape)
            #expect(decoded.keys == expectedKeys, "k4v4 key decode differs at level \(level)")
            #expect(decoded.values == expectedValues, "k4v4 value decode differs at level \(level)")
        }
    }

    @Test(arguments: shapes)
    func q8MatchesReferenceBitForBit(shape: SectionShape) throws {
        let seed = UInt64(shape.tokens * 31 + shape.kvHeads)
        let (keys, values) = kvSection(shape, seed: seed)
        let vectors = shape.vectorsPerPart, d = shape.headDim
        let expected = ScalarReference.q8Encode(floats(keys, shape.elementType), vectors: vectors, d: d)
            + ScalarReference.q8Encode(floats(values, shape.elementType), vectors: vectors, d: d)
        let half = expected.count / 2
        let expectedKeys = ScalarReference.q8Decode(Array(expected[..<half]), vectors: vectors, d: d).map { shape.elementType.bits(from: $0) }
        let expectedValues = ScalarReference.q8Decode(Array(expected[half...]), vectors: vectors, d: d).map { shape.elementType.bits(from: $0) }
        try forEachKernelLevel { level in
            let codec = SectionCodec(Codec(.q8))
            #expect(try codec.encode(keys: keys, values: values, shape: shape) == expected, "q8 encode, level \(level), seed \(seed)")
            let decoded = try codec.decode(expected, shape: shape)
            #expect(decoded.keys == expectedKeys && decoded.values == expectedValues, "q8 decode, level \(level)")
        }
    }

    /// tq sums may be evaluated in any order (the spec allows last-bit differences), so codes
    /// must agree almost everywhere and decoded vectors must be within a hair of the reference.
    @Test(arguments: [Quantizer.tq4, .tq3], [32, 64, 128, 256])
    func tqMatchesReference(quantizer: Quantizer, headDim: Int) throws {
        let shape = SectionShape(tokens: 37, kvHeads: 2, headDim: headDim)
        let bits = quantizer == .tq4 ? 4 : 3
        let seed = UInt64(headDim * 13 + bits)
        let (keys, values) = kvSection(shape, seed: seed)
        let vectors = shape.vectorsPerPart
        let fk = floats(keys, .float16), fv = floats(values, .float16)
        let expected = ScalarReference.tqEncode(fk, vectors: vectors, d: headDim, bits: bits)
            + ScalarReference.tqEncode(fv, vectors: vectors, d: headDim, bits: bits)
        let half = expected.count / 2
        let reference = ScalarReference.tqDecode(Array(expected[..<half]), vectors: vectors, d: headDim, bits: bits)
            + ScalarReference.tqDecode(Array(expected[half...]), vectors: vectors, d: headDim, bits: bits)
        try forEachKernelLevel { level in
            let codec = SectionCodec(Codec(quantizer))
            let encoded = try codec.encode(keys: keys, values: values, shape: shape)
            #expect(encoded.count == expected.count)
            let differing = zip(encoded, expected).filter { $0 != $1 }.count
            #expect(Double(differing) <= 0.002 * Double(expected.count),
                    "\(quantizer) level \(level): \(differing) of \(expected.count) bytes differ from the reference, seed \(seed)")
            let decoded = try codec.decode(expected, shape: shape)
            let got = floats(decoded.keys, .float16) + floats(decoded.values, .float16)
            #expect(relativeError(reference, got) < 2e-3, "\(quantizer) decode at level \(level)")
        }
    }

    @Test(arguments: [32, 64, 128, 256])
    func tq3mMatchesReference(headDim: Int) throws {
        for elementType in ElementType.allCases {
            let shape = SectionShape(tokens: 45, kvHeads: 3, headDim: headDim, elementType: elementType)
            let seed = UInt64(headDim * 101)
            let (keys, values) = kvSection(shape, seed: seed)
            let (t, h, d) = (shape.tokens, shape.kvHeads, shape.headDim)
            let expected = ScalarReference.tq3mEncode(floats(keys, elementType), t: t, h: h, d: d)
                + ScalarReference.tq3mEncode(floats(values, elementType), t: t, h: h, d: d)
            let half = expected.count / 2
            let reference = ScalarReference.tq3mDecode(Array(expected[..<half]), t: t, h: h, d: d)
                + ScalarReference.tq3mDecode(Array(expected[half...]), t: t, h: h, d: d)
            try forEachKernelLevel { level in
                let codec = SectionCodec(Codec(.tq3m))
                let encoded = try codec.encode(keys: keys, values: values, shape: shape)
                #expect(encoded.count == expected.count)
                let differing = zip(encoded, expected).filter { $0 != $1 }.count
                #expect(Double(differing) <= 0.002 * Double(expected.count),
                        "tq3m level \(level) \(elementType): \(differing) of \(expected.count) bytes differ, seed \(seed)")
                let decoded = try codec.decode(expected, shape: shape)
                let got = floats(decoded.keys, elementType) + floats(decoded.values, elementType)
                #expect(relativeError(reference, got) < 4e-3, "tq3m decode at level \(level) \(elementType)")
            }
        }
    }

    @Test func shuffleIsAByteTranspose() {
        var random = SplitMix64(seed: 0x5AFF1E)
        for count in [0, 1, 7, 63, 64, 65, 1000, 4099] {
            let source = (0..<2 * count).map { _ in UInt8(truncatingIfNeeded: random.next()) }
            let expected = stride(from: 0, to: 2 * count, by: 2).map { source[$0] } + stride(from: 1, to: 2 * count, by: 2).map { source[$0] }
            var shuffled = [UInt8](repeating: 0, count: 2 * count)
            var restored = [UInt8](repeating: 0, count: 2 * count)
            forEachKernelLevel { level in
                kvt_shuffle2(source, count, &shuffled)
                kvt_unshuffle2(shuffled, count, &restored)
                #expect(shuffled == expected && restored == source, "shuffle of \(count) elements at level \(level)")
            }
        }
    }
}
