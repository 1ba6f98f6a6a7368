#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import CKVTierKernels
import KVTierCore

/// The engine of `kvtier codec advise` and of the daemon's codec policy: round-trips real K/V
/// through every codec page by page, as the disk tier stores them, measures what that does to
/// the tensors and to causal attention over them, and names the most compact codec whose
/// attention error stays within a bound.
///
/// Attention error: for every layer, sampled query position i and query head h, the output
/// `softmax(q_i Kᵀ / √d) V` over keys 0...i (query head h reads KV head h / (qHeads / kvHeads))
/// in Float32 with the original K, V and with the decoded ones; reported as
/// ‖O' − O‖ / ‖O‖ over all of them (Frobenius norms, summed across layers). Without queries
/// each KV head's keys act as its own query head (`queriesFrom == "keys"`), a proxy that
/// over-weights each token's own key. Method and caveats: docs/codecs.md.
public struct CodecAdvisor: Sendable {
    /// Query positions per layer that the default stride evaluates at most: attention costs
    /// O(positions × T × d) per head, and 256 keep the six-layer fixture within seconds.
    public static let defaultMaxQueryPositions = 256

    public struct Options: Sendable {
        /// Tokens per page, as the daemon stores them (`Limits.defaultPageTokens`).
        public var pageTokens = Limits.defaultPageTokens
        /// Evaluate every `queryStride`-th query position, counted back from the last token
        /// (which is always evaluated); nil: the smallest stride that keeps at most
        /// `defaultMaxQueryPositions` positions per layer.
        public var queryStride: Int?
        /// The candidates, in order (ties on size and error go to the earlier one).
        public var codecs = Codec.all
        public init() {}
    }

    public struct Candidate: Codable, Sendable, Equatable {
        public var codec: String
        /// The codec's stored bits per element for a full page of this input's heads and head dim.
        public var bitsPerElement: Double
        /// Bits per element it actually stored for these tensors (the lossless stage included).
        public var storedBitsPerElement: Double?
        public var attentionError: Double?
        /// Attention error of each layer alone.
        public var layerAttentionErrors: [Double]?
        /// ‖K̂ − K‖ / ‖K‖ and max |K̂ − K| over all layers; the same for V.
        public var keyError: Double?
        public var valueError: Double?
        public var keyMaxAbsError: Double?
        public var valueMaxAbsError: Double?
        /// Decoding gave back every input bit.
        public var bitExact: Bool?
        /// Why the codec was not measured (a head dim it cannot encode, input it refuses).
        public var skipped: String?
    }

    public struct Report: Codable, Sendable, Equatable {
        /// The choice: nil when no candidate is within `maxAttentionError`.
        public var codec: String?
        public var bitsPerElement: Double?
        public var attentionError: Double?
        public var maxAttentionError: Double
        /// "queries", "end queries" (a decoding step's, after the last token), or "keys" when the
        /// keys stood in for the queries.
        public var queriesFrom: String
        public var message: String
        public var layers: Int
        public var tokens: Int
        public var kvHeads: Int
        public var queryHeads: Int
        public var headDim: Int
        public var elementType: String
        public var pageTokens: Int
        public var queryStride: Int
        public var queryPositionsPerLayer: Int
        public var candidates: [Candidate]

        /// The choice's fields are written as `null` when there is none, so scripts can test for it.
        public func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(codec, forKey: .codec)
            try c.encode(bitsPerElement, forKey: .bitsPerElement)
            try c.encode(attentionError, forKey: .attentionError)
            try c.encode(maxAttentionError, forKey: .maxAttentionError)
            try c.encode(queriesFrom, forKey: .queriesFrom)
            try c.encode(message, forKey: .message)
            try c.encode(layers, forKey: .layers)
            try c.encode(tokens, forKey: .tokens)
            try c.encode(kvHeads, forKey: .kvHeads)
            try c.encode(queryHeads, forKey: .queryHeads)
            try c.encode(headDim, forKey: .headDim)
            try c.encode(elementType, forKey: .elementType)
            try c.encode(pageTokens, forKey: .pageTokens)
            try c.encode(queryStride, forKey: .queryStride)
            try c.encode(queryPositionsPerLayer, forKey: .queryPositionsPerLayer)
            try c.encode(candidates, forKey: .candidates)
        }
    }

    public var tensors: AdvisorTensors
    public var options: Options

    public init(tensors: AdvisorTensors, options: Options = Options()) throws(AdvisorError) {
        guard options.pageTokens >= 1, options.pageTokens <= Limits.maxPageTokens else {
            throw AdvisorError("page tokens must be 1...\(Limits.maxPageTokens), got \(options.pageTokens)")
        }
        if let stride = options.queryStride, stride < 1 {
            throw AdvisorError("query stride must be at least 1, got \(stride)")
        }
        guard !options.codecs.isEmpty else { throw AdvisorError("no codecs to compare") }
        self.tensors = tensors
        self.options = options
    }

    public var queryStride: Int {
        options.queryStride ?? max(1, (tensors.tokens + Self.defaultMaxQueryPositions - 1) / Self.defaultMaxQueryPositions)
    }

    /// The evaluated query positions, ascending; the last token is always one of them.
    public var queryPositions: [UInt32] {
        stride(from: tensors.tokens - 1, through: 0, by: -queryStride).reversed().map { UInt32($0) }
    }

    /// Measures every candidate and picks one. `maxAttentionError` is a fraction (0.01 = 1 %).
    public func run(maxAttentionError: Double) throws(AdvisorError) -> Report {
        try report(measure(), maxAttentionError: maxAttentionError)
    }

    /// Every candidate in `options.codecs` order, measured (or skipped with the reason).
    public func measure() -> [Candidate] {
        let reference = Measure(tensors: tensors, positions: queryPositions)
        let page = SectionShape(tokens: options.pageTokens, kvHeads: tensors.kvHeads, headDim: tensors.headDim,
                                elementType: tensors.elementType)
        // A lossless stage decodes to the same bits as its quantizer alone: measure those once.
        var measured: [(keys: [[UInt16]], values: [[UInt16]], candidate: Candidate)] = []
        var candidates: [Candidate] = []
        for codec in options.codecs {
            var candidate = Candidate(codec: codec.name, bitsPerElement: codec.quantizer.bitsPerElement(page))
            do throws(CodecError) {
                try codec.quantizer.check(page)
                let trip = try roundtrip(codec)
                candidate.storedBitsPerElement = Double(trip.encodedBytes * 8) / Double(2 * tensors.layers * tensors.keys[0].count)
                if let earlier = measured.first(where: { sameBits($0.keys, trip.keys) && sameBits($0.values, trip.values) }) {
                    candidate.copyMeasures(from: earlier.candidate)
                } else {
                    reference.measure(keys: trip.keys, values: trip.values, into: &candidate)
                    measured.append((trip.keys, trip.values, candidate))
                }
            } catch {
                candidate.skipped = error.description
            }
            candidates.append(candidate)
        }
        return candidates
    }

    /// The choice among measured `candidates`: the fewest bits per element whose attention error
    /// is ≤ `maxAttentionError`; ties go to the lower error, then to the earlier candidate.
    public func report(_ candidates: [Candidate], maxAttentionError: Double) throws(AdvisorError) -> Report {
        guard maxAttentionError.isFinite, maxAttentionError >= 0 else {
            throw AdvisorError("the attention error bound must be a fraction ≥ 0 (e.g. 0.01), got \(maxAttentionError)")
        }
        var best: Candidate?
        for candidate in candidates {
            guard let error = candidate.attentionError, error <= maxAttentionError else { continue }
            if let chosen = best, let chosenError = chosen.attentionError,
               (chosen.bitsPerElement, chosenError) <= (candidate.bitsPerElement, error) { continue }
            best = candidate
        }
        let message: String
        if let best {
            message = "\(best.codec) is the most compact codec within the bound: attention error "
                + "\(formatDecimal(best.attentionError! * 100, places: 3)) % ≤ \(formatDecimal(maxAttentionError * 100, places: 3)) %"
                + " at \(formatDecimal(best.bitsPerElement, places: 3)) bits/element"
        } else if let closest = candidates.filter({ $0.attentionError != nil }).min(by: { $0.attentionError! < $1.attentionError! }) {
            message = "no codec keeps the attention error within \(formatDecimal(maxAttentionError * 100, places: 3)) %; "
                + "the lowest is \(closest.codec) at \(formatDecimal(closest.attentionError! * 100, places: 3)) %: "
                + "raise the bound or include fp16 (always exact) among the candidates"
        } else {
            message = "no candidate codec can encode these tensors (see each one's 'skipped'); include fp16 among the candidates"
        }
        return Report(
            codec: best?.codec, bitsPerElement: best?.bitsPerElement, attentionError: best?.attentionError,
            maxAttentionError: maxAttentionError, queriesFrom: tensors.queriesFrom,
            message: message, layers: tensors.layers, tokens: tensors.tokens, kvHeads: tensors.kvHeads,
            queryHeads: tensors.queryHeads, headDim: tensors.headDim, elementType: tensors.elementType.description,
            pageTokens: options.pageTokens, queryStride: queryStride,
            queryPositionsPerLayer: tensors.endQueries == nil ? queryPositions.count : tensors.endQueryCount,
            candidates: candidates)
    }

    /// Every layer encoded and decoded page by page with `codec`, as the disk tier does.
    private func roundtrip(_ codec: Codec) throws(CodecError) -> (keys: [[UInt16]], values: [[UInt16]], encodedBytes: Int) {
        let section = SectionCodec(codec)
        let (t, h, d) = (tensors.tokens, tensors.kvHeads, tensors.headDim)
        let row = h * d
        var buffer = [UInt8](repeating: 0, count: section.maxEncodedSize(
            SectionShape(tokens: min(options.pageTokens, t), kvHeads: h, headDim: d, elementType: tensors.elementType)))
        var keys: [[UInt16]] = []
        var values: [[UInt16]] = []
        var encodedBytes = 0
        for layer in 0..<tensors.layers {
            var outKeys = [UInt16](repeating: 0, count: t * row)
            var outValues = [UInt16](repeating: 0, count: t * row)
            for start in stride(from: 0, to: t, by: options.pageTokens) {
                let shape = SectionShape(tokens: min(options.pageTokens, t - start), kvHeads: h, headDim: d,
                                         elementType: tensors.elementType)
                let bytes = start * row * 2..<(start + shape.tokens) * row * 2
                let outcome = tensors.keys[layer].withUnsafeBytes { k in
                    tensors.values[layer].withUnsafeBytes { v in
                        buffer.withUnsafeMutableBytes { encoded in
                            outKeys.withUnsafeMutableBytes { dk in
                                outValues.withUnsafeMutableBytes { dv in
                                    Result { () throws(CodecError) -> Int in
                                        let written = try section.encode(
                                            keys: UnsafeRawBufferPointer(rebasing: k[bytes]),
                                            values: UnsafeRawBufferPointer(rebasing: v[bytes]), shape: shape, into: encoded)
                                        try section.decode(
                                            UnsafeRawBufferPointer(rebasing: encoded[0..<written]), shape: shape,
                                            keys: UnsafeMutableRawBufferPointer(rebasing: dk[bytes]),
                                            values: UnsafeMutableRawBufferPointer(rebasing: dv[bytes]))
                                        return written
                                    }
                                }
                            }
                        }
                    }
                }
                encodedBytes += try outcome.get()
            }
            keys.append(outKeys)
            values.append(outValues)
        }
        return (keys, values, encodedBytes)
    }
}

extension CodecAdvisor.Candidate {
    init(codec: String, bitsPerElement: Double) {
        self.codec = codec
        self.bitsPerElement = bitsPerElement
    }

    mutating func copyMeasures(from other: Self) {
        attentionError = other.attentionError
        layerAttentionErrors = other.layerAttentionErrors
        keyError = other.keyError
        valueError = other.valueError
        keyMaxAbsError = other.keyMaxAbsError
        valueMaxAbsError = other.valueMaxAbsError
        bitExact = other.bitExact
    }
}

/// The original tensors widened to Float32 and the reference attention outputs, computed once
/// and compared against each codec's decoded tensors.
private struct Measure {
    let tensors: AdvisorTensors
    let positions: [UInt32]
    let keys: [[Float]]
    let values: [[Float]]
    let queries: [[Float]]
    let outputs: [[Float]]

    init(tensors: AdvisorTensors, positions: [UInt32]) {
        self.tensors = tensors
        self.positions = positions
        keys = tensors.keys.map(tensors.floats)
        values = tensors.values.map(tensors.floats)
        queries = (tensors.endQueries ?? tensors.queries).map { $0.map(tensors.floats) } ?? keys
        var outputs: [[Float]] = []
        for layer in 0..<tensors.layers {
            outputs.append(Self.attention(tensors: tensors, positions: positions, queries: queries[layer],
                                          keys: keys[layer], values: values[layer]))
        }
        self.outputs = outputs
    }

    func measure(keys decodedKeys: [[UInt16]], values decodedValues: [[UInt16]], into candidate: inout CodecAdvisor.Candidate) {
        var keySums = ErrorSums(), valueSums = ErrorSums(), attentionSums = ErrorSums()
        var layerErrors: [Double] = []
        var bitExact = true
        for layer in 0..<tensors.layers {
            let exact = sameBits([decodedKeys[layer]], [tensors.keys[layer]]) && sameBits([decodedValues[layer]], [tensors.values[layer]])
            bitExact = bitExact && exact
            let k = tensors.floats(decodedKeys[layer])
            let v = tensors.floats(decodedValues[layer])
            keySums.add(keys[layer], k)
            valueSums.add(values[layer], v)
            var layerSums = ErrorSums()
            if exact {
                // The same inputs give the same outputs: the error is exactly zero.
                layerSums.add(outputs[layer], outputs[layer])
            } else {
                let output = Self.attention(tensors: tensors, positions: positions, queries: queries[layer], keys: k, values: v)
                layerSums.add(outputs[layer], output)
            }
            layerErrors.append(layerSums.relative)
            attentionSums.add(layerSums)
        }
        candidate.attentionError = attentionSums.relative
        candidate.layerAttentionErrors = layerErrors
        candidate.keyError = keySums.relative
        candidate.valueError = valueSums.relative
        candidate.keyMaxAbsError = keySums.largest
        candidate.valueMaxAbsError = valueSums.largest
        candidate.bitExact = bitExact
    }

    static func attention(tensors: AdvisorTensors, positions: [UInt32], queries: [Float], keys: [Float], values: [Float]) -> [Float] {
        if tensors.endQueries != nil { return attentionAtEnd(tensors: tensors, queries: queries, keys: keys, values: values) }
        let queryHeads = tensors.queries == nil ? tensors.kvHeads : tensors.queryHeads
        var output = [Float](repeating: 0, count: positions.count * queryHeads * tensors.headDim)
        var scores = [Float](repeating: 0, count: tensors.tokens)
        let status = queries.withUnsafeBufferPointer { q in
            keys.withUnsafeBufferPointer { k in
                values.withUnsafeBufferPointer { v in
                    positions.withUnsafeBufferPointer { p in
                        scores.withUnsafeMutableBufferPointer { s in
                            output.withUnsafeMutableBufferPointer { o in
                                kvt_causal_attention_f32(
                                    q.baseAddress, k.baseAddress, v.baseAddress, tensors.tokens, queryHeads, tensors.kvHeads,
                                    tensors.headDim, p.baseAddress, p.count, s.baseAddress, o.baseAddress)
                            }
                        }
                    }
                }
            }
        }
        precondition(status == 0, "attention arguments were validated by AdvisorTensors")
        return output
    }
}

extension Measure {
    /// Each end query attends every token.
    static func attentionAtEnd(tensors: AdvisorTensors, queries: [Float], keys: [Float], values: [Float]) -> [Float] {
        let count = tensors.endQueryCount
        var output = [Float](repeating: 0, count: count * tensors.queryHeads * tensors.headDim)
        var scores = [Float](repeating: 0, count: tensors.tokens)
        let status = queries.withUnsafeBufferPointer { q in
            keys.withUnsafeBufferPointer { k in
                values.withUnsafeBufferPointer { v in
                    scores.withUnsafeMutableBufferPointer { s in
                        output.withUnsafeMutableBufferPointer { o in
                            kvt_attention_at_end_f32(q.baseAddress, count, k.baseAddress, v.baseAddress, tensors.tokens, tensors.queryHeads,
                                                     tensors.kvHeads, tensors.headDim, s.baseAddress, o.baseAddress)
                        }
                    }
                }
            }
        }
        precondition(status == 0, "attention arguments were validated by AdvisorTensors")
        return output
    }
}

/// Σ (other − reference)², Σ reference², max |other − reference|.
private struct ErrorSums {
    var difference = 0.0
    var norm = 0.0
    var largest = 0.0

    var relative: Double { norm > 0 ? (difference / norm).squareRoot() : (difference > 0 ? .infinity : 0) }

    mutating func add(_ reference: [Float], _ other: [Float]) {
        var sums = (0.0, 0.0, 0.0)
        reference.withUnsafeBufferPointer { r in
            other.withUnsafeBufferPointer { o in
                withUnsafeMutablePointer(to: &sums) {
                    $0.withMemoryRebound(to: Double.self, capacity: 3) {
                        kvt_error_sums_f32(r.baseAddress, o.baseAddress, r.count, $0)
                    }
                }
            }
        }
        add(ErrorSums(difference: sums.0, norm: sums.1, largest: sums.2))
    }

    mutating func add(_ other: ErrorSums) {
        difference += other.difference
        norm += other.norm
        largest = max(largest, other.largest)
    }
}

/// Whether two lists of arrays hold the same bits (memcmp: `==` on arrays is slow in debug builds).
private func sameBits(_ a: [[UInt16]], _ b: [[UInt16]]) -> Bool {
    guard a.count == b.count else { return false }
    for (x, y) in zip(a, b) {
        guard x.count == y.count else { return false }
        let equal = x.withUnsafeBytes { p in y.withUnsafeBytes { q in p.count == 0 || memcmp(p.baseAddress!, q.baseAddress!, p.count) == 0 } }
        if !equal { return false }
    }
    return true
}
