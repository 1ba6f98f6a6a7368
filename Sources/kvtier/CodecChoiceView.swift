import KVTierClient
import KVTierCodec
import KVTierCore
import KVTierProtocol

/// A model's disk codec as the daemon's codec policy decided it (`CODECS`), as `kvtier status`
/// and `kvtier pages` print it.
struct CodecChoiceView: Encodable {
    var modelID: String
    var model: String?
    /// `fixed`, `measuring`, `chosen` or `fell-back`.
    var policy: String
    /// The codec new pages are written with.
    var codec: String
    /// Measured when the codec was chosen; nil when it was not measured.
    var attentionError: Double?
    var maxAttentionError: Double?
    var lastCheckError: Double?
    var checks: Int
    var fallbacks: Int
    var sampledTokens: Int
    var sampledLayers: Int
    /// `keys` (the keys stood in for the queries) or `queries`.
    var queriesFrom: String
    var message: String

    init(_ c: CodecChoiceInfo, models: ModelDirectory) {
        func finite(_ x: Float) -> Double? { x.isFinite ? Double(x) : nil }
        modelID = modelHex(c.modelID)
        model = models.name(c.modelID)
        policy = c.phase.description
        codec = (try? Codec(tag: c.codecTag))?.name ?? "tag 0x\(String(c.codecTag, radix: 16))"
        attentionError = finite(c.attentionError)
        maxAttentionError = c.phase == .fixed ? nil : finite(c.maxAttentionError)
        lastCheckError = finite(c.lastCheckError)
        checks = Int(c.checks)
        fallbacks = Int(c.fallbacks)
        sampledTokens = Int(c.sampledTokens)
        sampledLayers = Int(c.sampledLayers)
        queriesFrom = c.queriesFromKeys ? "keys" : "queries"
        message = c.message
    }

    /// The daemon's choices, or none from a daemon that predates `CODECS`.
    static func fetch(_ client: KVTierClient, models: ModelDirectory) async throws -> [CodecChoiceView] {
        do {
            return try await client.codecChoices().map { CodecChoiceView($0, models: models) }
        } catch KVTierClientError.server(.unknownOpcode, _) {
            return []
        }
    }

    static let header = ["MODEL", "POLICY", "CODEC", "ATTN ERR", "BOUND", "CHECKS", "FALLBACKS", "LAST DECISION"]
    var row: [String] {
        func percent(_ x: Double?) -> String { x.map { formatDecimal($0 * 100, places: 2) + " %" } ?? "—" }
        return [model ?? modelID, policy, codec, percent(attentionError), percent(maxAttentionError), "\(checks)", "\(fallbacks)", message]
    }
}
