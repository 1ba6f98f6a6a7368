import KVTierCodec
import KVTierCore
import Testing

/// `tq3s` and `tq2s` (docs/codec-layouts.md, "`tq3s` and `tq2s`"): the C kernel against bytes of
/// the NumPy reference (Benchmarks/quality/codecs_ref.py `tqx_encode_section`), the layout's
/// sizes, the kept first token, and corrupt fields.
@Suite struct MixedTQTests {
    /// keys[i] = ((37 i) mod 101 − 50) / 16, values[i] = ((53 i) mod 97 − 48) / 32: exact in fp16,
    /// and the same in Python without any shared random generator.
    static func ramp(_ shape: SectionShape) -> (keys: [UInt16], values: [UInt16]) {
        let n = shape.elementsPerPart
        let keys = (0..<n).map { Float16(Float((37 * $0) % 101 - 50) / 16).bitPattern }
        let values = (0..<n).map { Float16(Float((53 * $0) % 97 - 48) / 32).bitPattern }
        return (keys, values)
    }

    /// `tqx_encode_section(name, k, v)` of `ramp` for T = 4, H = 1, D = 32, printed by NumPy.
    static let numpyBytes: [Quantizer: String] = [
        .tq3s: "40c280ba003e00c100b2404080bf0037804100bd403ce0c100b9c03ea0c00000a040c0be0039e04140bc003d80c100b7803f40c00032004100be803a404200bb00b5abaeab2e00352b3880bd803babbb00ba55b855b500b0552dab340038ab39c0bc803c2bba80b8abb5abb0002c5534ab3780392b3b00bc403dabb800b655b1ca48ff79cf1446982014016487aaedfc4415e2bb6f9fc639536145b3fe411ac93df873d9b79dfc570a00be0031e0bc003780bbc03940b9003c00b6203d00aee0bd0032c0bc803740bb003a00b9203c80b5403d00acc0bd0033a0bc003800bb403ac0b8403c00b5603dd53695bbd5b455b955a52bb62b34abae5538ab31953a553755bb55b415b95521abb5ab34abac9538ab32d53ad53715bbabb3d5b855292bb52b3555a9d538ab330146ef67670dd79d9deab1b0cfffab98f21baeae15424680f064540dd45191ea7dbb7f",
        .tq2s: "40c280ba003e00c100b2404080bf0037804100bd403ce0c100b9c03ea0c00000a040c0be0039e04140bc003d80c100b7803f40c00032004100be803a404200bb00b5abaeab2e00352b3880bd803babbb00ba55b855b500b0552dab340038ab39c0bc803c2bba80b8abb5abb0002c5534ab3780392b3b00bc403dabb800b655b1a948ff996f84a648b084a16487fca485725b9fcf66995361ff21aa699d781369579dfc00be0031e0bc003780bbc03940b9003c00b6203d00aee0bd0032c0bc803740bb003a00b9203c80b5403d00acc0bd0033a0bc003800bb403ac0b8403c00b5603dd53695bbd5b455b955a52bb62b34abae5538ab31953a553755bb55b415b95521abb5ab34abac9538ab32d53ad53715bbabb3d5b855292bb52b3555a9d538ab333746ef69690cd99696edbaffa596f315a5a51249f06a5a0cda5a9aed76",
    ]

    static func bytes(hex: String) -> [UInt8] {
        let digits = Array(hex.utf8)
        return stride(from: 0, to: digits.count, by: 2).map { UInt8(String(decoding: digits[$0..<$0 + 2], as: UTF8.self), radix: 16)! }
    }

    @Test(arguments: [Quantizer.tq3s, .tq2s])
    func encodingMatchesTheNumPyReferenceByteForByte(quantizer: Quantizer) throws {
        let shape = SectionShape(tokens: 4, kvHeads: 1, headDim: 32)
        let (keys, values) = Self.ramp(shape)
        let expected = Self.bytes(hex: Self.numpyBytes[quantizer]!)
        try forEachKernelLevel { level in
            let encoded = try SectionCodec(Codec(quantizer)).encode(keys: keys, values: values, shape: shape)
            #expect(encoded == expected, "\(quantizer) at level \(level): \(zip(encoded, expected).filter { $0 != $1 }.count) bytes differ")
        }
    }

    /// The layout's sizes, written out: kept tokens, means, per-head maxima, then per vector one
    /// scale byte and D/32 blocks (tq3s keys 12 bytes, values 10; tq2s keys 10, values 8).
    @Test func sizesFollowTheLayout() {
        func size(_ t: Int, _ h: Int, _ d: Int, _ keyBlock: Int, _ valueBlock: Int) -> Int {
            let fixed = h * d * 2 + h * d * 2 + h * 2
            return 2 * fixed + (t - 1) * h * (2 + d / 32 * (keyBlock + valueBlock))
        }
        for (t, h, d) in [(256, 2, 128), (256, 3, 64), (37, 8, 32), (1, 1, 256)] {
            let shape = SectionShape(tokens: t, kvHeads: h, headDim: d)
            #expect(Quantizer.tq3s.sectionSize(shape) == size(t, h, d, 12, 10), "tq3s \(shape)")
            #expect(Quantizer.tq2s.sectionSize(shape) == size(t, h, d, 10, 8), "tq2s \(shape)")
        }
        // The figures of docs/codecs.md: a full page at each model's head dim.
        #expect(Quantizer.tq3s.bitsPerElement(SectionShape(tokens: 256, kvHeads: 2, headDim: 128)) == 2.927001953125)
        #expect(Quantizer.tq3s.bitsPerElement(SectionShape(tokens: 256, kvHeads: 3, headDim: 64)) == 2.98974609375)
        #expect(Quantizer.tq2s.bitsPerElement(SectionShape(tokens: 256, kvHeads: 2, headDim: 128)) == 2.428955078125)
        #expect(Quantizer.tq2s.bitsPerElement(SectionShape(tokens: 256, kvHeads: 3, headDim: 64)) == 2.49169921875)
    }

    /// The page's first token comes back bit for bit (an attention sink sits there), in both
    /// element types; a one-token section is nothing but that token.
    @Test(arguments: [Quantizer.tq3s, .tq2s])
    func theFirstTokenIsKeptExactly(quantizer: Quantizer) throws {
        for type in ElementType.allCases {
            for tokens in [1, 2, 255] {
                let shape = SectionShape(tokens: tokens, kvHeads: 3, headDim: 64, elementType: type)
                let (keys, values) = kvSection(shape, seed: UInt64(tokens))
                let codec = SectionCodec(Codec(quantizer))
                let decoded = try codec.decode(try codec.encode(keys: keys, values: values, shape: shape), shape: shape)
                let row = shape.kvHeads * shape.headDim
                #expect(decoded.keys.prefix(row) == keys.prefix(row) && decoded.values.prefix(row) == values.prefix(row),
                        "\(quantizer) \(shape): the first token changed")
                if tokens > 2 {
                    #expect(decoded.keys != keys, "\(quantizer) \(shape) lost nothing: is it quantizing?")
                }
            }
        }
    }

    /// Offsets of the fields of the keys part for `shape` (one kept token, centred).
    static func fieldOffsets(_ shape: SectionShape) -> (mean: Int, maximum: Int, vectors: Int) {
        let hd = shape.kvHeads * shape.headDim
        return (hd * 2, 2 * hd * 2, 2 * hd * 2 + shape.kvHeads * 2)
    }

    @Test(arguments: [Quantizer.tq3s, .tq2s])
    func corruptFieldsAreRefused(quantizer: Quantizer) throws {
        let shape = SectionShape(tokens: 40, kvHeads: 2, headDim: 64)
        let (keys, values) = kvSection(shape, seed: 404)
        let codec = SectionCodec(Codec(quantizer))
        let encoded = try codec.encode(keys: keys, values: values, shape: shape)
        let at = Self.fieldOffsets(shape)
        let damages: [(String, Int, [UInt8])] = [
            ("a kept element that is NaN", 6, [0x01, 0x7E]),
            ("an infinite mean", at.mean + 10, [0x00, 0x7C]),
            ("a NaN maximum alpha", at.maximum, [0x00, 0x7E]),
            ("a negative maximum alpha", at.maximum + 2, [0x00, 0xBC]),
        ]
        for (what, offset, patch) in damages {
            var damaged = encoded
            damaged.replaceSubrange(offset..<offset + 2, with: patch)
            #expect(throws: CodecError.self, "\(quantizer) decoded \(what)") { try codec.decode(damaged, shape: shape) }
        }
        // A scale byte or a code is any value: damage there decodes (to other numbers).
        var damaged = encoded
        damaged[at.vectors] ^= 0xFF
        damaged[at.vectors + 5] ^= 0x5A
        #expect(throws: Never.self) { _ = try codec.decode(damaged, shape: shape) }
    }

    /// Keys whose vectors are too long for an fp16 maximum alpha (bfloat16 beyond the fp16
    /// range, away from the first token) are refused as non-finite, like the other tq codecs.
    @Test(arguments: [Quantizer.tq3s, .tq2s])
    func alphasBeyondFloat16AreRefused(quantizer: Quantizer) throws {
        let shape = SectionShape(tokens: 8, kvHeads: 1, headDim: 32, elementType: .bfloat16)
        var (keys, values) = kvSection(shape, seed: 9)
        for d in 0..<32 { keys[5 * 32 + d] = ElementType.bfloat16.bits(from: d % 2 == 0 ? 1e6 : -1e6) }
        #expect(throws: CodecError.self) { try SectionCodec(Codec(quantizer)).encode(keys: keys, values: values, shape: shape) }
        // The same values in the kept first token are stored as given.
        (keys, values) = kvSection(shape, seed: 9)
        for d in 0..<32 { keys[d] = ElementType.bfloat16.bits(from: 1e6) }
        let codec = SectionCodec(Codec(quantizer))
        #expect(try codec.decode(try codec.encode(keys: keys, values: values, shape: shape), shape: shape).keys.prefix(32) == keys.prefix(32))
    }
}
