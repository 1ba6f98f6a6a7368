#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif
import CKVTierKernels
import KVTierCodec
import KVTierCore
import KVTierTools
import Testing

/// `kvtier codec advise`'s engine: attention kernel, input checks, measurements and the choice.
@Suite struct CodecAdvisorTests {
    static let fixture = "../shared/fixtures/kv/tinyllama-license"
    static var fixtureExists: Bool { FileManager.default.fileExists(atPath: fixture + "/k_0.npy") }
    static let quantizers = Quantizer.allCases.map { Codec($0) }

    static func fixtureTensors(queries: Bool) throws -> AdvisorTensors {
        func files(_ part: String) throws -> [AdvisorTensors.Source] {
            try (0..<6).map { try .read("\(fixture)/\(part)_\($0).npy") }
        }
        return try AdvisorTensors(keys: files("k"), values: files("v"), queries: queries ? files("q") : nil)
    }

    /// Measured once for the fixture tests (plain quantizers and one lossless variant).
    static let fixtureCandidates: Result<(CodecAdvisor, [CodecAdvisor.Candidate]), any Error> = Result {
        var options = CodecAdvisor.Options()
        options.codecs = quantizers + [Codec(.k4v4, .zstd(level: 1))]
        let advisor = try CodecAdvisor(tensors: fixtureTensors(queries: true), options: options)
        return (advisor, advisor.measure())
    }

    static func error(_ candidates: [CodecAdvisor.Candidate], _ codec: String) -> Double {
        candidates.first { $0.codec == codec }?.attentionError ?? .nan
    }

    // MARK: - The kernel

    /// The C kernel against a direct Double evaluation of softmax(q kᵀ/√d) v with GQA, on a head
    /// dim that is not a multiple of the kernel's eight lanes.
    @Test func attentionKernelMatchesADirectEvaluation() {
        let seed: UInt64 = 0xA77E
        var random = SplitMix64(seed: seed)
        let (t, qh, kh, d) = (37, 4, 2, 20)
        let q = (0..<t * qh * d).map { _ in random.nextGaussian() }
        let k = (0..<t * kh * d).map { _ in random.nextGaussian() }
        let v = (0..<t * kh * d).map { _ in random.nextGaussian() }
        let positions: [UInt32] = [0, 5, 17, 36]
        var out = [Float](repeating: .nan, count: positions.count * qh * d)
        var scores = [Float](repeating: 0, count: t)
        let status = kvt_causal_attention_f32(q, k, v, t, qh, kh, d, positions, positions.count, &scores, &out)
        #expect(status == 0)
        var worst = 0.0
        for (p, i) in positions.map(Int.init).enumerated() {
            for h in 0..<qh {
                let g = h / (qh / kh)
                let logits = (0...i).map { j in
                    (0..<d).reduce(0.0) { $0 + Double(q[(i * qh + h) * d + $1]) * Double(k[(j * kh + g) * d + $1]) } / Double(d).squareRoot()
                }
                let top = logits.max()!
                let weights = logits.map { exp($0 - top) }
                let total = weights.reduce(0, +)
                for c in 0..<d {
                    let expected = (0...i).reduce(0.0) { $0 + weights[$1] * Double(v[($1 * kh + g) * d + c]) } / total
                    worst = max(worst, abs(Double(out[(p * qh + h) * d + c]) - expected))
                }
            }
        }
        #expect(worst < 1e-5, "largest deviation \(worst) (seed \(seed))")
        #expect(kvt_causal_attention_f32(q, k, v, t, 3, kh, d, positions, positions.count, &scores, &out) == -1,
                "3 query heads do not share 2 KV heads")
        #expect(kvt_causal_attention_f32(q, k, v, t, qh, kh, d, [UInt32(t)], 1, &scores, &out) == -1, "position past the end")
    }

    // MARK: - The fixture

    @Test(.enabled(if: fixtureExists, "the KV fixture (../shared/fixtures/kv/tinyllama-license) is absent: skipped"))
    func fixtureErrorsAreOrderedAndMatchTheNumPyReference() throws {
        let (advisor, candidates) = try Self.fixtureCandidates.get()
        #expect(advisor.queryStride == 4 && advisor.queryPositions.count == 256 && advisor.queryPositions.last == 1023)
        let fp16 = try #require(candidates.first { $0.codec == "fp16" })
        #expect(fp16.bitExact == true && fp16.attentionError! < 1e-3 && fp16.keyError == 0 && fp16.valueError == 0)
        for candidate in candidates where candidate.codec != "fp16" {
            #expect(candidate.bitExact == false && candidate.attentionError! > fp16.attentionError!, "\(candidate)")
            #expect(candidate.keyError! > 0 && candidate.valueError! > 0 && candidate.keyMaxAbsError! > 0)
            #expect(candidate.layerAttentionErrors?.count == 6)
        }
        // Orderings with wide margins on this data (q8 1.1 %, k4v4 8.7 %, tq4 12.6 %, tq3m 20.6 %, tq3 24 %).
        let e = { Self.error(candidates, $0) }
        #expect(e("fp16") < e("q8") && e("q8") < e("k4v4") && e("k4v4") < e("tq4") && e("tq4") < e("tq3"))
        #expect(e("tq3m") < e("tq3"), "mean removal must help")
        // Benchmarks/quality/eval_codecs.py (NumPy, every query position) measured these on the same
        // tensors (docs/benchmarks.md); every 4th position must land within 3 % of them.
        let numpy = ["q8": 0.0108, "k4v4": 0.0872, "tq4": 0.1262, "tq3": 0.2391, "tq3m": 0.2059, "tq3s": 0.2833, "tq2s": 0.3639]
        for (codec, expected) in numpy {
            #expect(abs(e(codec) / expected - 1) < 0.03, "\(codec): \(e(codec)) against NumPy's \(expected)")
        }
        // A lossless stage changes the bytes stored, never the numbers.
        let zstd = try #require(candidates.first { $0.codec == "k4v4+zstd" })
        let k4v4 = try #require(candidates.first { $0.codec == "k4v4" })
        #expect(zstd.attentionError == k4v4.attentionError && zstd.keyError == k4v4.keyError)
        #expect(zstd.bitsPerElement == 5 && zstd.storedBitsPerElement! < k4v4.storedBitsPerElement!)
        #expect(k4v4.storedBitsPerElement == 5, "1024 tokens are four full 256-token pages")
    }

    @Test(.enabled(if: fixtureExists, "the KV fixture (../shared/fixtures/kv/tinyllama-license) is absent: skipped"))
    func fixtureChoicesFollowTheBound() throws {
        let (advisor, candidates) = try Self.fixtureCandidates.get()
        let expected: [(Double, String)] = [(0, "fp16"), (1e-4, "fp16"), (0.05, "q8"), (0.1, "k4v4"), (0.15, "tq4"),
                                            (0.21, "tq3m"), (0.25, "tq3"), (0.3, "tq3s"), (0.5, "tq2s")]
        for (bound, codec) in expected {
            let report = try advisor.report(candidates, maxAttentionError: bound)
            #expect(report.codec == codec, "bound \(bound): \(report.message)")
            #expect(report.attentionError! <= bound && report.queriesFrom == "queries" && report.queryHeads == 4)
            for other in candidates where other.attentionError! <= bound {
                #expect(other.bitsPerElement >= report.bitsPerElement!, "\(other.codec) is smaller and within \(bound)")
            }
        }
        #expect(throws: AdvisorError.self) { try advisor.report(candidates, maxAttentionError: -0.01) }
        #expect(throws: AdvisorError.self) { try advisor.report(candidates, maxAttentionError: .nan) }
    }

    @Test(.enabled(if: fixtureExists, "the KV fixture (../shared/fixtures/kv/tinyllama-license) is absent: skipped"))
    func withoutQueriesTheKeysStandIn() throws {
        var options = CodecAdvisor.Options()
        options.codecs = [Codec(.fp16), Codec(.q8)]
        options.queryStride = 16
        let report = try CodecAdvisor(tensors: Self.fixtureTensors(queries: false), options: options).run(maxAttentionError: 0.05)
        #expect(report.queriesFrom == "keys" && report.queryHeads == 2 && report.queryPositionsPerLayer == 64)
        #expect(report.codec == "q8")
        #expect(Self.error(report.candidates, "q8") > 1e-3)
    }

    @Test(.enabled(if: fixtureExists, "the KV fixture (../shared/fixtures/kv/tinyllama-license) is absent: skipped"))
    func fixtureShapeMismatchesAreRefusedNamingTheFile() throws {
        let keys = try AdvisorTensors.Source.read("\(Self.fixture)/k_0.npy")
        let queries = try AdvisorTensors.Source.read("\(Self.fixture)/q_0.npy")
        let error = #expect(throws: ToolError.self) { try AdvisorTensors(keys: [keys], values: [queries], queries: nil) }
        #expect(error?.description.contains("q_0.npy") == true && error?.description.contains("must match") == true, "\(String(describing: error))")
        let missing = #expect(throws: ToolError.self) { try AdvisorTensors.Source.read("\(Self.fixture)/k_9.npy") }
        #expect(missing?.description == "'\(Self.fixture)/k_9.npy' does not exist; give the path of a .npy file")
        let directory = #expect(throws: ToolError.self) { try AdvisorTensors.Source.read(Self.fixture) }
        #expect(directory?.description.contains("is a directory") == true)
    }

    // MARK: - Synthetic data (no fixture)

    /// float16 K and V with one outlier key channel, 300 tokens (a partial last page), 4 query
    /// heads over 2 KV heads: whatever the bound, the choice is within it and nothing smaller is.
    @Test func syntheticChoiceSatisfiesTheBound() throws {
        let seed: UInt64 = 0x0E7
        let data = Self.synthetic(tokens: 300, kvHeads: 2, queryHeads: 4, headDim: 64, seed: seed)
        let tensors = try AdvisorTensors(tokens: 300, kvHeads: 2, headDim: 64, keys: [data.keys], values: [data.values],
                                         queries: [data.queries], queryHeads: 4)
        var options = CodecAdvisor.Options()
        options.codecs = Self.quantizers
        let advisor = try CodecAdvisor(tensors: tensors, options: options)
        let candidates = advisor.measure()
        #expect(candidates.allSatisfy { $0.skipped == nil && $0.attentionError != nil }, "seed \(seed)")
        #expect(Self.error(candidates, "fp16") == 0 && Self.error(candidates, "q8") < Self.error(candidates, "tq3"), "seed \(seed)")
        for bound in [0, 0.005, 0.02, 0.05, 0.1, 0.2, 0.4, 1] {
            let report = try advisor.report(candidates, maxAttentionError: bound)
            let chosen = try #require(report.codec, "fp16 is always within a bound ≥ 0")
            #expect(report.attentionError! <= bound, "\(chosen) at bound \(bound), seed \(seed)")
            let cheaper = candidates.filter { $0.attentionError! <= bound && $0.bitsPerElement < report.bitsPerElement! }
            #expect(cheaper.isEmpty, "bound \(bound): \(cheaper.map(\.codec)) smaller than \(chosen), seed \(seed)")
        }
        let pages = try #require(candidates.first { $0.codec == "k4v4" })
        #expect(pages.storedBitsPerElement! != pages.bitsPerElement, "a 44-token last page stores a different ratio")
    }

    @Test func noCodecWithinTheBoundSaysSo() throws {
        let data = Self.synthetic(tokens: 64, kvHeads: 1, queryHeads: 1, headDim: 32, seed: 7)
        var options = CodecAdvisor.Options()
        options.codecs = [Codec(.tq3), Codec(.k4v4)]
        let report = try CodecAdvisor(tensors: AdvisorTensors(tokens: 64, kvHeads: 1, headDim: 32, keys: [data.keys], values: [data.values]),
                                      options: options).run(maxAttentionError: 0)
        #expect(report.codec == nil && report.bitsPerElement == nil && report.attentionError == nil)
        #expect(report.message.contains("no codec") && report.message.contains("fp16"))
        let json = String(decoding: try JSONEncoder().encode(report), as: UTF8.self)
        #expect(json.contains("\"codec\":null") && json.contains("\"attentionError\":null"), "\(json)")
    }

    @Test func codecsThatCannotEncodeTheHeadDimAreSkippedWithTheReason() throws {
        let data = Self.synthetic(tokens: 40, kvHeads: 2, queryHeads: 2, headDim: 48, seed: 3)
        let advisor = try CodecAdvisor(tensors: AdvisorTensors(tokens: 40, kvHeads: 2, headDim: 48, keys: [data.keys], values: [data.values]))
        let candidates = advisor.measure()
        #expect(candidates.count == Codec.all.count)
        for candidate in candidates {
            if candidate.codec.hasPrefix("fp16") || candidate.codec.hasPrefix("q8") {
                #expect(candidate.skipped == nil && candidate.attentionError != nil, "\(candidate)")
            } else {
                #expect(candidate.skipped?.contains("headDim") == true && candidate.attentionError == nil, "\(candidate)")
            }
        }
        #expect(try advisor.report(candidates, maxAttentionError: 0.5).codec == "q8")
    }

    @Test func wrongShapesAreRefusedWithAMessage() {
        func arrays(_ shape: [Int]) -> [AdvisorTensors.Source] {
            [AdvisorTensors.Source(name: "x\(shape).npy", array: NumPyArray(shape: shape, elements: .init(repeating: 0x3C00, count: shape.reduce(1, *))))]
        }
        func refusal(_ keys: [Int], _ values: [Int], _ queries: [Int]? = nil) -> String {
            do {
                _ = try AdvisorTensors(keys: arrays(keys), values: arrays(values), queries: queries.map(arrays))
                return "accepted"
            } catch {
                return "\(error)"
            }
        }
        #expect(refusal([8, 2, 32], [8, 2, 32]) == "accepted")
        #expect(refusal([3, 8, 2, 32], [3, 8, 2, 32], [3, 8, 4, 32]) == "accepted")
        #expect(refusal([8, 64], [8, 64]).contains("expected [tokens, heads, headDim]"))
        #expect(refusal([8, 2, 32], [9, 2, 32]).contains("must match"))
        #expect(refusal([8, 2, 32], [8, 2, 32], [7, 4, 32]).contains("7 tokens but keys have 8"))
        #expect(refusal([8, 2, 32], [8, 2, 32], [8, 3, 32]).contains("not a multiple"))
        #expect(refusal([8, 2, 32], [8, 2, 32], [8, 2, 16]).contains("head dim 16"))
        #expect(refusal([2, 8, 2, 32], [8, 2, 32]).contains("layers"))
        #expect(refusal([8, 2, 32], [8, 2, 32], [2, 8, 2, 32]).contains("2 layers"))
        #expect(throws: AdvisorError.self) {
            var options = CodecAdvisor.Options()
            options.queryStride = 0
            _ = try CodecAdvisor(tensors: AdvisorTensors(keys: arrays([8, 2, 32]), values: arrays([8, 2, 32]), queries: nil), options: options)
        }
    }

    /// Keys with a per-channel offset and one outlier channel per head (×8), values and queries N(0, 1).
    static func synthetic(tokens: Int, kvHeads: Int, queryHeads: Int, headDim: Int, seed: UInt64)
        -> (keys: [UInt16], values: [UInt16], queries: [UInt16]) {
        var random = SplitMix64(seed: seed)
        let channels = kvHeads * headDim
        let offsets = (0..<channels).map { _ in random.nextGaussian() }
        var keys = [UInt16](), values = [UInt16](), queries = [UInt16]()
        for _ in 0..<tokens {
            for c in 0..<channels {
                let outlier: Float = c % headDim == 5 ? 8 : 1
                keys.append(Float16(outlier * (offsets[c] + random.nextGaussian())).bitPattern)
                values.append(Float16(random.nextGaussian()).bitPattern)
            }
            for _ in 0..<queryHeads * headDim { queries.append(Float16(random.nextGaussian()).bitPattern) }
        }
        return (keys, values, queries)
    }
}
