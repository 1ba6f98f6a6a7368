import KVTierCore

/// One model's disk codec as the daemon's codec policy decided it, for the asking tenant
/// (`CODECS` reply entry): `u64 modelID`, `u8 phase` (`Phase`), `u8 queriesFrom` (0 the keys
/// stood in for the queries, 1 queries), `u32 codecTag` (the codec new pages are written with),
/// `f32 attentionError` (measured when the codec was chosen; NaN when not measured),
/// `f32 maxAttentionError` (the bound), `f32 lastCheckError` (NaN before the first check),
/// `u32 checks`, `u32 fallbacks`, `u32 sampledTokens`, `u16 sampledLayers`, `string message`.
public struct CodecChoiceInfo: Sendable, Equatable {
    public enum Phase: UInt8, Sendable, CustomStringConvertible {
        /// The model's own codec, or the daemon's `diskCodec` under the `fixed` policy.
        case fixed = 0
        /// `auto`: the first sample is not measured yet; pages are written with `diskCodec`.
        case measuring = 1
        /// `auto`: chosen on the first sample.
        case chosen = 2
        /// `auto`: a later sample measured the codec past the bound; a safer one took over.
        case fellBack = 3

        public var description: String {
            switch self {
            case .fixed: "fixed"
            case .measuring: "measuring"
            case .chosen: "chosen"
            case .fellBack: "fell-back"
            }
        }
    }

    public var modelID: UInt64
    public var phase: Phase
    public var queriesFromKeys: Bool
    public var codecTag: UInt32
    public var attentionError: Float
    public var maxAttentionError: Float
    public var lastCheckError: Float
    public var checks: UInt32
    public var fallbacks: UInt32
    public var sampledTokens: UInt32
    public var sampledLayers: UInt16
    public var message: String

    public init(modelID: UInt64, phase: Phase, queriesFromKeys: Bool, codecTag: UInt32, attentionError: Float, maxAttentionError: Float,
                lastCheckError: Float, checks: UInt32, fallbacks: UInt32, sampledTokens: UInt32, sampledLayers: UInt16, message: String) {
        self.modelID = modelID
        self.phase = phase
        self.queriesFromKeys = queriesFromKeys
        self.codecTag = codecTag
        self.attentionError = attentionError
        self.maxAttentionError = maxAttentionError
        self.lastCheckError = lastCheckError
        self.checks = checks
        self.fallbacks = fallbacks
        self.sampledTokens = sampledTokens
        self.sampledLayers = sampledLayers
        self.message = message
    }

    static let minimumBytes = 8 + 1 + 1 + 4 + 4 + 4 + 4 + 4 + 4 + 4 + 2 + 2

    /// Equal as the wire carries them: errors compare by bit pattern (NaN, "not measured", equals itself).
    public static func == (a: Self, b: Self) -> Bool {
        a.modelID == b.modelID && a.phase == b.phase && a.queriesFromKeys == b.queriesFromKeys && a.codecTag == b.codecTag
            && a.attentionError.bitPattern == b.attentionError.bitPattern
            && a.maxAttentionError.bitPattern == b.maxAttentionError.bitPattern
            && a.lastCheckError.bitPattern == b.lastCheckError.bitPattern && a.checks == b.checks && a.fallbacks == b.fallbacks
            && a.sampledTokens == b.sampledTokens && a.sampledLayers == b.sampledLayers && a.message == b.message
    }

    func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        writer.u64(modelID)
        writer.u8(phase.rawValue)
        writer.u8(queriesFromKeys ? 0 : 1)
        writer.u32(codecTag)
        writer.f32(attentionError)
        writer.f32(maxAttentionError)
        writer.f32(lastCheckError)
        writer.u32(checks)
        writer.u32(fallbacks)
        writer.u32(sampledTokens)
        writer.u16(sampledLayers)
        // A long message is cut at a character boundary rather than refused.
        var text = Substring(message)
        while text.utf8.count > ProtocolLimits.maxStringBytes { text = text.dropLast() }
        try writer.wireString(String(text), field: "message")
    }

    init(from reader: inout BodyReader) throws(ProtocolError) {
        modelID = try reader.u64()
        let rawPhase = try reader.u8()
        guard let phase = Phase(rawValue: rawPhase) else { throw .malformed("CODECS reply: phase \(rawPhase) is not 0-3") }
        self.phase = phase
        let queries = try reader.u8()
        guard queries <= 1 else { throw .malformed("CODECS reply: queriesFrom \(queries) is not 0 or 1") }
        queriesFromKeys = queries == 0
        codecTag = try reader.u32()
        attentionError = try reader.f32()
        maxAttentionError = try reader.f32()
        lastCheckError = try reader.f32()
        checks = try reader.u32()
        fallbacks = try reader.u32()
        sampledTokens = try reader.u32()
        sampledLayers = try reader.u16()
        message = try reader.string("message")
    }
}

/// `CODECS` reply: `u32 total` (the asking tenant's models), `u32 count`, then `count ×
/// CodecChoiceInfo` from position `offset` of the list, by model id.
public struct CodecsReply: WireBody {
    public var total: UInt32
    public var choices: [CodecChoiceInfo]

    public init(total: UInt32, choices: [CodecChoiceInfo]) {
        self.total = total
        self.choices = choices
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        guard choices.count <= ProtocolLimits.maxListEntries else {
            throw .tooLarge(what: "CODECS reply entries", size: UInt64(choices.count), limit: UInt64(ProtocolLimits.maxListEntries))
        }
        writer.u32(total)
        writer.u32(UInt32(choices.count))
        for choice in choices { try choice.encode(into: &writer) }
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "CODECS reply")
        total = try reader.u32()
        let count = try reader.count("choices", limit: ProtocolLimits.maxListEntries, elementBytes: CodecChoiceInfo.minimumBytes)
        var choices: [CodecChoiceInfo] = []
        choices.reserveCapacity(count)
        for _ in 0..<count { choices.append(try CodecChoiceInfo(from: &reader)) }
        self.choices = choices
        try reader.finish()
    }
}

/// `QUERY_SAMPLE` request: a decoding step's attention queries, which the codec policy measures
/// codecs with instead of the keys (docs/codecs.md, "Codec policy"). `u64 modelID`,
/// `u16 layers`, `u16 queryHeads`, `u16 headDim`, `u16 count` (1 to `maxQueries`), then
/// `layers × count × queryHeads × headDim` 16-bit elements in the model's element type, layer
/// by layer (queries after RoPE). The empty reply needs no type. Matching the shape to the model
/// is the daemon's check; the body is bounded by `maxControlBody`.
public struct QuerySample: WireBody {
    public var modelID: UInt64
    public var layers: UInt16
    public var queryHeads: UInt16
    public var headDim: UInt16
    public var count: UInt16
    /// `layers × count × queryHeads × headDim` bit patterns.
    public var elements: [UInt16]

    /// Most queries (per layer) one sample carries.
    public static let maxQueries = 16

    public init(modelID: UInt64, layers: UInt16, queryHeads: UInt16, headDim: UInt16, count: UInt16, elements: [UInt16]) {
        self.modelID = modelID
        self.layers = layers
        self.queryHeads = queryHeads
        self.headDim = headDim
        self.count = count
        self.elements = elements
    }

    var expectedElements: Int { Int(layers) * Int(count) * Int(queryHeads) * Int(headDim) }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        guard count >= 1, Int(count) <= Self.maxQueries else {
            throw .tooLarge(what: "QUERY_SAMPLE queries (1 to maxQueries)", size: UInt64(count), limit: UInt64(Self.maxQueries))
        }
        guard elements.count == expectedElements else {
            throw .malformed("QUERY_SAMPLE holds \(elements.count) elements, not layers × count × queryHeads × headDim = \(expectedElements)")
        }
        writer.u64(modelID)
        writer.u16(layers)
        writer.u16(queryHeads)
        writer.u16(headDim)
        writer.u16(count)
        elements.withUnsafeBytes { writer.raw($0) }
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "QUERY_SAMPLE request")
        modelID = try reader.u64()
        layers = try reader.u16()
        queryHeads = try reader.u16()
        headDim = try reader.u16()
        count = try reader.u16()
        guard count >= 1, Int(count) <= Self.maxQueries else {
            throw .malformed("QUERY_SAMPLE count \(count) is outside 1...\(Self.maxQueries)")
        }
        let bytes = try reader.bytes(Int(layers) * Int(count) * Int(queryHeads) * Int(headDim) * 2)
        elements = Array(bytes.bindMemory(to: UInt16.self))
        try reader.finish()
    }
}
