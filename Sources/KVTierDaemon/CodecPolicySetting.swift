import KVTierCodec
import KVTierCore
import KVTierStore

/// The `codecPolicy` config key: `"fixed"`, `"auto"`, or an object
/// `{"mode": "auto", "maxAttentionError": 0.15, "candidates": ["tq3", "tq4", "k4v4"], "samplePages": 4,
/// "checkEvery": 64}` whose missing fields keep their defaults (`CodecPolicy.Configuration`).
public struct CodecPolicySetting: Codable, Equatable, Sendable {
    public var mode: String = CodecPolicy.Configuration.Mode.fixed.rawValue
    public var maxAttentionError: Double?
    public var candidates: [String]?
    public var samplePages: Int?
    public var checkEvery: Int?

    public init() {}

    public init(mode: String) { self.mode = mode }

    static let fields = ["mode", "maxAttentionError", "candidates", "samplePages", "checkEvery"]
    static let allowed = "\"fixed\", \"auto\", or an object with the keys \(fields.joined(separator: ", ")) (docs/configuration.md)"

    private struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(_ string: String) { stringValue = string }
        init?(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    public init(from decoder: any Decoder) throws {
        if let mode = try? decoder.singleValueContainer().decode(String.self) {
            self.mode = mode
            return
        }
        let container = try decoder.container(keyedBy: Key.self)
        if let unknown = container.allKeys.map(\.stringValue).sorted().first(where: { !Self.fields.contains($0) }) {
            throw DaemonConfiguration.Invalid(key: "codecPolicy.\(unknown)", value: "(present)", allowed: "one of " + Self.fields.joined(separator: ", "))
        }
        func value<T: Decodable>(_ name: String, _ type: T.Type, _ what: String) throws -> T? {
            do { return try container.decodeIfPresent(T.self, forKey: Key(name)) } catch {
                throw DaemonConfiguration.Invalid(key: "codecPolicy.\(name)", value: "(wrong type)", allowed: what)
            }
        }
        mode = try value("mode", String.self, "\"fixed\" or \"auto\"") ?? mode
        maxAttentionError = try value("maxAttentionError", Double.self, "a fraction such as 0.15")
        candidates = try value("candidates", [String].self, "a list of codec names")
        samplePages = try value("samplePages", Int.self, "an integer")
        checkEvery = try value("checkEvery", Int.self, "an integer")
    }

    /// Checked and with defaults filled in.
    public func resolved() throws -> CodecPolicy.Configuration {
        var c = CodecPolicy.Configuration()
        guard let mode = CodecPolicy.Configuration.Mode(rawValue: mode) else {
            throw DaemonConfiguration.Invalid(key: "codecPolicy.mode", value: mode, allowed: "fixed, auto")
        }
        c.mode = mode
        if let maxAttentionError {
            guard maxAttentionError.isFinite, maxAttentionError >= 0, maxAttentionError <= 1 else {
                throw DaemonConfiguration.Invalid(key: "codecPolicy.maxAttentionError", value: "\(maxAttentionError)",
                                                  allowed: "a fraction from 0 to 1 (0.15 = 15 % attention-output error)")
            }
            c.maxAttentionError = maxAttentionError
        }
        if let candidates {
            guard !candidates.isEmpty else {
                throw DaemonConfiguration.Invalid(key: "codecPolicy.candidates", value: "[]", allowed: "at least one codec name")
            }
            c.candidates = try candidates.map { name in
                do { return try Codec(name: name) } catch {
                    throw DaemonConfiguration.Invalid(key: "codecPolicy.candidates", value: name,
                                                      allowed: Codec.all.map(\.name).joined(separator: ", "))
                }
            }
        }
        if let samplePages {
            guard (1...64).contains(samplePages) else {
                throw DaemonConfiguration.Invalid(key: "codecPolicy.samplePages", value: "\(samplePages)", allowed: "1...64")
            }
            c.samplePages = samplePages
        }
        if let checkEvery {
            guard (1...1_000_000).contains(checkEvery) else {
                throw DaemonConfiguration.Invalid(key: "codecPolicy.checkEvery", value: "\(checkEvery)", allowed: "1...1000000 pages")
            }
            c.checkEvery = checkEvery
        }
        return c
    }

    /// The resolved policy as `kvtierd --print-config` writes it.
    static func json(_ c: CodecPolicy.Configuration) -> String {
        "{\"mode\": \"\(c.mode.rawValue)\", \"maxAttentionError\": \(c.maxAttentionError), "
            + "\"candidates\": [" + c.candidates.map { "\"\($0.name)\"" }.joined(separator: ", ") + "], "
            + "\"samplePages\": \(c.samplePages), \"checkEvery\": \(c.checkEvery)}"
    }
}
