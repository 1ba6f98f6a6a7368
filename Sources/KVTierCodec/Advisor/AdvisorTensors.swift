import CKVTierKernels
import KVTierCore

/// Why a codec measurement could not run: the inputs or options it was given, in words.
public struct AdvisorError: Error, Equatable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// The keys, values and (optionally) queries a `CodecAdvisor` measures on, split into layers:
/// every layer `[tokens, kvHeads, headDim]` for keys and values and `[tokens, queryHeads, headDim]`
/// for queries, as 16-bit bit patterns. `kvtier codec advise` reads them from `.npy` files; the
/// daemon's codec policy takes them from the pages a model stores.
public struct AdvisorTensors: Sendable {
    public var tokens: Int
    public var kvHeads: Int
    public var queryHeads: Int
    public var headDim: Int
    public var elementType: ElementType
    public var keys: [[UInt16]]
    public var values: [[UInt16]]
    /// Nil when no queries were given: the keys stand in for them (see `CodecAdvisor`).
    public var queries: [[UInt16]]?
    /// Queries that stand after the last token, as a decoding step's do (`[count, queryHeads,
    /// headDim]` per layer), measured instead of per-position queries: the daemon's codec policy
    /// gets them from clients (`QUERY_SAMPLE`), long after the tokens it samples were written.
    public var endQueries: [[UInt16]]?

    /// Where the attention's queries come from: "queries", "end queries" or "keys".
    public var queriesFrom: String { endQueries != nil ? "end queries" : queries != nil ? "queries" : "keys" }

    /// Queries per layer in `endQueries`.
    public var endQueryCount: Int { endQueries.map { $0[0].count / (queryHeads * headDim) } ?? 0 }

    public var layers: Int { keys.count }

    /// Checks that every layer holds `tokens × kvHeads × headDim` elements (queries:
    /// `tokens × queryHeads × headDim`, query heads a multiple of the KV heads) and that keys,
    /// values and queries have as many layers.
    public init(tokens: Int, kvHeads: Int, headDim: Int, keys: [[UInt16]], values: [[UInt16]],
                queries: [[UInt16]]? = nil, queryHeads: Int? = nil, endQueries: [[UInt16]]? = nil,
                elementType: ElementType = .float16) throws(AdvisorError) {
        guard tokens >= 1, kvHeads >= 1, headDim >= 1 else {
            throw AdvisorError("an empty shape: \(tokens) tokens, \(kvHeads) KV heads, head dim \(headDim)")
        }
        guard !keys.isEmpty else { throw AdvisorError("no keys given") }
        guard keys.count == values.count else {
            throw AdvisorError("keys hold \(keys.count) layers but values hold \(values.count); give each layer's keys and values")
        }
        let perLayer = tokens * kvHeads * headDim
        for (role, layers) in [("keys", keys), ("values", values)] {
            if let bad = layers.firstIndex(where: { $0.count != perLayer }) {
                throw AdvisorError("\(role) layer \(bad) holds \(layers[bad].count) elements, not [\(tokens), \(kvHeads), \(headDim)] = \(perLayer)")
            }
        }
        let queryHeads = queries == nil && endQueries == nil ? kvHeads : queryHeads ?? kvHeads
        guard queries == nil || endQueries == nil else { throw AdvisorError("give per-position queries or end queries, not both") }
        if let endQueries {
            guard endQueries.count == keys.count else {
                throw AdvisorError("end queries hold \(endQueries.count) layers but keys hold \(keys.count); give one array per key layer")
            }
            guard queryHeads >= 1, queryHeads % kvHeads == 0 else {
                throw AdvisorError("\(queryHeads) query heads is not a multiple of the \(kvHeads) KV heads (grouped-query attention needs qHeads = n × kvHeads)")
            }
            let vector = queryHeads * headDim
            let count = endQueries[0].count / vector
            if let bad = endQueries.firstIndex(where: { $0.count != count * vector || $0.isEmpty }) {
                throw AdvisorError("end queries layer \(bad) holds \(endQueries[bad].count) elements; every layer needs the same count of [\(queryHeads), \(headDim)] queries, at least one")
            }
        }
        if let queries {
            guard queries.count == keys.count else {
                throw AdvisorError("queries hold \(queries.count) layers but keys hold \(keys.count); give one query array per key layer")
            }
            guard queryHeads >= 1, queryHeads % kvHeads == 0 else {
                throw AdvisorError("\(queryHeads) query heads is not a multiple of the \(kvHeads) KV heads (grouped-query attention needs qHeads = n × kvHeads)")
            }
            let perQueryLayer = tokens * queryHeads * headDim
            if let bad = queries.firstIndex(where: { $0.count != perQueryLayer }) {
                throw AdvisorError("queries layer \(bad) holds \(queries[bad].count) elements, not [\(tokens), \(queryHeads), \(headDim)] = \(perQueryLayer)")
            }
        }
        self.tokens = tokens
        self.kvHeads = kvHeads
        self.queryHeads = queryHeads
        self.headDim = headDim
        self.elementType = elementType
        self.keys = keys
        self.values = values
        self.queries = queries
        self.endQueries = endQueries
    }

    /// The elements as Float32, exactly (the kernels' widening).
    func floats(_ bits: [UInt16]) -> [Float] {
        var out = [Float](repeating: 0, count: bits.count)
        bits.withUnsafeBufferPointer { source in
            out.withUnsafeMutableBufferPointer { target in
                switch elementType {
                case .float16: kvt_f16_to_f32(source.baseAddress, source.count, target.baseAddress)
                case .bfloat16: kvt_bf16_to_f32(source.baseAddress, source.count, target.baseAddress)
                }
            }
        }
        return out
    }
}
