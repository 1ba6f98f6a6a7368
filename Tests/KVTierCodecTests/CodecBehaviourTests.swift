import KVTierCodec
import KVTierCore
import Testing

@Suite struct CodecNamingTests {
    @Test func everyCodecNameAndTagRoundTrips() throws {
        #expect(Codec.all.count == Quantizer.allCases.count * 3)
        for codec in Codec.all {
            #expect(try Codec(name: codec.name) == codec)
            #expect(try Codec(tag: codec.tag) == codec)
        }
        #expect(try Codec(name: "k4v4+zstd(3)") == Codec(.k4v4, .zstd(level: 3)))
        #expect(try Codec(name: "fp16+zstd-5").name == "fp16+zstd(5)")
        #expect(try Codec(name: "K4V4+LZ4") == Codec(.k4v4, .lz4))
    }

    @Test(arguments: ["", "k5v5", "k4v4+", "k4v4+gzip", "k4v4+zstd(0)", "k4v4+zstd(20)", "+zstd", "k4v4+none+lz4"])
    func badNamesAreRefusedByName(name: String) {
        #expect(throws: CodecError.unknownCodec(name)) { try Codec(name: name) }
    }

    @Test func unknownTagsAreRefused() {
        for tag: UInt32 in [0, 99, 0x0300_0003, 0x0000_0903, 0x0000_1402] {
            #expect(throws: CodecError.unknownTag(tag)) { try Codec(tag: tag) }
        }
    }

    @Test func bitsPerElementMatchTheLayout() {
        let page = SectionShape(tokens: 256, kvHeads: 2, headDim: 128)
        #expect(Quantizer.fp16.bitsPerElement(page) == 16)
        #expect(Quantizer.q8.bitsPerElement(page) == 8.125)
        #expect(Quantizer.k4v4.bitsPerElement(page) == 5.0)
        #expect(Quantizer.tq4.bitsPerElement(page) == 4.125)
        #expect(Quantizer.tq3.bitsPerElement(page) == 3.125)
        #expect(Quantizer.tq3m.bitsPerElement(page) == 3.1875)
        #expect(Quantizer.tq3s.bitsPerElement(page) == 2.927001953125)
        #expect(Quantizer.tq2s.bitsPerElement(page) == 2.428955078125)
    }
}

@Suite struct CodecRoundTripTests {
    static let shape = SectionShape(tokens: 256, kvHeads: 2, headDim: 128)

    /// Reconstruction error bounds on KV-like data: loose enough for every correct
    /// implementation, tight enough that a broken quantizer fails.
    @Test(arguments: [
        (Quantizer.q8, 0.02, 0.01), (.k4v4, 0.06, 0.12), (.tq4, 0.11, 0.11), (.tq3, 0.2, 0.2), (.tq3m, 0.16, 0.2),
        (.tq3s, 0.06, 0.3), (.tq2s, 0.09, 0.37),
    ])
    func lossyErrorIsBounded(quantizer: Quantizer, keyBound: Double, valueBound: Double) throws {
        let seed: UInt64 = 0xC0DEC
        let (keys, values) = kvSection(Self.shape, seed: seed)
        for stage in [LosslessStage.none, .lz4, .zstd(level: 1)] {
            let codec = SectionCodec(Codec(quantizer, stage))
            let decoded = try codec.decode(try codec.encode(keys: keys, values: values, shape: Self.shape), shape: Self.shape)
            let ek = relativeError(floats(keys, .float16), floats(decoded.keys, .float16))
            let ev = relativeError(floats(values, .float16), floats(decoded.values, .float16))
            #expect(ek < keyBound && ev < valueBound, "\(codec.codec): K error \(ek), V error \(ev), seed \(seed)")
            #expect(ek > 0 && ev > 0, "a lossy codec that loses nothing is not quantizing")
        }
    }

    @Test(arguments: [LosslessStage.none, .lz4, .zstd(level: 1), .zstd(level: 9)])
    func fp16KeepsEveryBitIncludingNonFinite(stage: LosslessStage) throws {
        for type in ElementType.allCases {
            let shape = SectionShape(tokens: 100, kvHeads: 3, headDim: 40, elementType: type)
            var (keys, values) = kvSection(shape, seed: 77)
            keys[5] = 0x7E01  // a NaN payload
            keys[6] = type == .float16 ? 0x7C00 : 0x7F80  // +Inf
            values[7] = 0x8000  // -0
            let codec = SectionCodec(Codec(.fp16, stage))
            let encoded = try codec.encode(keys: keys, values: values, shape: shape)
            let decoded = try codec.decode(encoded, shape: shape)
            #expect(decoded.keys == keys && decoded.values == values, "fp16+\(stage) lost bits for \(type)")
        }
    }

    @Test func zstdShrinksShuffledFloatData() throws {
        let (keys, values) = kvSection(Self.shape, seed: 5)
        let encoded = try SectionCodec(Codec(.fp16, .zstd(level: 1))).encode(keys: keys, values: values, shape: Self.shape)
        #expect(encoded[4] == 1, "frame should be compressed")
        #expect(Double(encoded.count) < 0.95 * Double(Self.shape.rawBytes), "fp16+zstd stored \(encoded.count) of \(Self.shape.rawBytes) bytes")
    }

    @Test func incompressibleSectionsAreStoredRaw() throws {
        var random = SplitMix64(seed: 11)
        let shape = SectionShape(tokens: 64, kvHeads: 1, headDim: 64)
        // Uniformly random bit patterns (fp16 keeps any pattern, NaNs included).
        let noise = (0..<shape.elementsPerPart).map { _ in UInt16(truncatingIfNeeded: random.next()) }
        for stage in [LosslessStage.lz4, .zstd(level: 1)] {
            let codec = SectionCodec(Codec(.fp16, stage))
            let encoded = try codec.encode(keys: noise, values: noise.reversed(), shape: shape)
            #expect(encoded[4] == 0 && encoded.count == SectionCodec.frameHeaderBytes + shape.rawBytes)
            #expect(try codec.decode(encoded, shape: shape).keys == noise)
        }
    }

    @Test func encodingIsDeterministic() throws {
        let (keys, values) = kvSection(Self.shape, seed: 99)
        for codec in Codec.all {
            let a = try SectionCodec(codec).encode(keys: keys, values: values, shape: Self.shape)
            let b = try SectionCodec(codec).encode(keys: keys, values: values, shape: Self.shape)
            #expect(a == b, "\(codec) is not deterministic")
        }
    }
}

@Suite struct CodecInputValidationTests {
    static let shape = SectionShape(tokens: 40, kvHeads: 2, headDim: 64)

    @Test(arguments: [Quantizer.q8, .k4v4, .tq4, .tq3, .tq3m, .tq3s, .tq2s])
    func nonFiniteInputIsRefusedWithACount(quantizer: Quantizer) throws {
        for type in ElementType.allCases {
            let shape = SectionShape(tokens: 40, kvHeads: 2, headDim: 64, elementType: type)
            var (keys, values) = kvSection(shape, seed: 3)
            values[10] = type.bits(from: .nan)
            values[200] = type.bits(from: -.infinity)
            #expect(throws: CodecError.nonFiniteInput(part: "values", count: 2)) {
                try SectionCodec(Codec(quantizer)).encode(keys: keys, values: values, shape: shape)
            }
            keys[0] = type.bits(from: .infinity)
            #expect(throws: CodecError.nonFiniteInput(part: "keys", count: 1)) {
                try SectionCodec(Codec(quantizer, .zstd(level: 1))).encode(keys: keys, values: values, shape: shape)
            }
        }
    }

    @Test func unsupportedShapesAreRefused() {
        let (keys, values) = kvSection(SectionShape(tokens: 4, kvHeads: 1, headDim: 80), seed: 1)
        #expect(throws: CodecError.self) {
            try SectionCodec(Codec(.k4v4)).encode(keys: keys, values: values, shape: SectionShape(tokens: 4, kvHeads: 1, headDim: 80))
        }
        #expect(throws: CodecError.self) {
            try SectionCodec(Codec(.tq4)).encode(keys: keys, values: values, shape: SectionShape(tokens: 4, kvHeads: 1, headDim: 80))
        }
        // q8 and fp16 take any head dimension.
        #expect(throws: Never.self) {
            _ = try SectionCodec(Codec(.q8)).encode(keys: keys, values: values, shape: SectionShape(tokens: 4, kvHeads: 1, headDim: 80))
        }
        #expect(throws: CodecError.bufferSize(what: "keys", expected: 640, actual: 638)) {
            try SectionCodec(Codec(.q8)).encode(keys: Array(keys.dropLast()), values: values, shape: SectionShape(tokens: 4, kvHeads: 1, headDim: 80))
        }
    }

    @Test func truncatedOrPaddedInputIsRefused() throws {
        let (keys, values) = kvSection(Self.shape, seed: 8)
        for codec in Codec.all {
            let section = SectionCodec(codec)
            let encoded = try section.encode(keys: keys, values: values, shape: Self.shape)
            for cut in [0, 1, 7, encoded.count / 2, encoded.count - 1] {
                #expect(throws: CodecError.self, "\(codec) accepted \(cut) of \(encoded.count) bytes") {
                    try section.decode(Array(encoded.prefix(cut)), shape: Self.shape)
                }
            }
            #expect(throws: CodecError.self, "\(codec) accepted a trailing byte") {
                try section.decode(encoded + [0], shape: Self.shape)
            }
        }
    }

    /// Random damage never crashes a decoder or makes it touch memory it was not given; it
    /// either throws or returns a section of the right size. Seeded and reproducible.
    @Test func corruptBytesNeverCrash() throws {
        let seed: UInt64 = 0xBADB17
        var random = SplitMix64(seed: seed)
        let (keys, values) = kvSection(Self.shape, seed: seed)
        var thrown = 0, decoded = 0
        for codec in Codec.all {
            let section = SectionCodec(codec)
            let encoded = try section.encode(keys: keys, values: values, shape: Self.shape)
            for _ in 0..<60 {
                var damaged = encoded
                for _ in 0..<(1 + Int(random.next() % 8)) {
                    damaged[Int(random.next() % UInt64(damaged.count))] ^= UInt8(1 << (random.next() % 8))
                }
                do {
                    let result = try section.decode(damaged, shape: Self.shape)
                    #expect(result.keys.count == Self.shape.elementsPerPart)
                    decoded += 1
                } catch {
                    thrown += 1
                }
            }
        }
        #expect(thrown > 0 && decoded > 0, "seed \(seed): thrown \(thrown), decoded \(decoded)")
    }

    @Test func nonFiniteScaleIsReportedAsCorruption() throws {
        let (keys, values) = kvSection(Self.shape, seed: 21)
        for quantizer in [Quantizer.q8, .k4v4, .tq4, .tq3, .tq3m, .tq3s, .tq2s] {
            let section = SectionCodec(Codec(quantizer))
            var encoded = try section.encode(keys: keys, values: values, shape: Self.shape)
            // The first fp16 of every layout is a scale or a minimum of the keys.
            encoded[0] = 0x00
            encoded[1] = 0x7C  // +Inf
            #expect(throws: CodecError.self, "\(quantizer) decoded an Inf scale") {
                try section.decode(encoded, shape: Self.shape)
            }
        }
    }
}
