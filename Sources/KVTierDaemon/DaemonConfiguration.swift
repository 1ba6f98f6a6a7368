#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import KVTierCodec
import KVTierCore

/// kvtierd's settings: embedded defaults, then a JSON config file (`--config`), then flags.
/// Invalid values stop the daemon at start with a message naming the key and what is allowed.
public struct DaemonConfiguration: Codable, Equatable, Sendable {
    public init() {}

    /// Unix socket clients connect to. Default: `KVTierPaths.defaultSocketPath()`.
    public var socket: String?
    /// Where page files live. Default: `KVTierPaths.defaultStateDirectory()`.
    public var stateDir: String?
    /// Most bytes of pages in RAM, over all tenants. Default 1GiB.
    public var ramBudget: String = "1GiB"
    /// Most bytes of page files on disk; empty for no limit. Default: no limit.
    public var diskBudget: String?
    /// Codec of pages written to disk. Default k4v4.
    public var diskCodec: String = "k4v4"
    /// Virtual size of each tenant's shared arena (committed only as used). Default 64GiB.
    public var arenaSize: String = "64GiB"
    /// Tokens per page for models that do not ask for another size. Default 256.
    public var pageTokens: Int = Limits.defaultPageTokens
    /// io_uring queue depth of disk reads. Default 64.
    public var ioQueueDepth: Int = 64

    public struct Invalid: Error, CustomStringConvertible {
        public var key: String
        public var value: String
        public var allowed: String
        public var description: String { "configuration key '\(key)' has value '\(value)'; allowed: \(allowed)" }
    }

    /// The resolved values the daemon runs with.
    public struct Resolved: Equatable, Sendable {
        public var socket: String
        public var stateDir: String
        public var ramBudgetBytes: Int
        public var diskBudgetBytes: Int?
        public var diskCodec: Codec
        public var arenaBytes: Int
        public var pageTokens: Int
        public var ioQueueDepth: Int
    }

    public static func load(file path: String) throws -> DaemonConfiguration {
        let data: Data
        do { data = try Data(contentsOf: URL(fileURLWithPath: path)) } catch {
            throw Invalid(key: "--config", value: path, allowed: "a readable JSON file (\(error))")
        }
        do { return try JSONDecoder().decode(DaemonConfiguration.self, from: data) } catch {
            throw Invalid(key: "--config", value: path, allowed: "a JSON object with the keys listed in kvtierd --help (\(error))")
        }
    }

    public func resolved() throws -> Resolved {
        func size(_ key: String, _ text: String) throws -> Int {
            guard let value = ByteCount(parsing: text), value.bytes > 0 else {
                throw Invalid(key: key, value: text, allowed: "a size such as 512MiB or 8GiB")
            }
            return value.bytes
        }
        let codec: Codec
        do { codec = try Codec(name: diskCodec) } catch {
            throw Invalid(key: "diskCodec", value: diskCodec, allowed: Codec.all.map(\.name).joined(separator: ", "))
        }
        guard (1...Limits.maxPageTokens).contains(pageTokens) else {
            throw Invalid(key: "pageTokens", value: "\(pageTokens)", allowed: "1...\(Limits.maxPageTokens)")
        }
        guard (1...4096).contains(ioQueueDepth) else {
            throw Invalid(key: "ioQueueDepth", value: "\(ioQueueDepth)", allowed: "1...4096")
        }
        let state = stateDir ?? KVTierPaths.defaultStateDirectory()
        return Resolved(
            socket: socket ?? KVTierPaths.defaultSocketPath(),
            stateDir: state,
            ramBudgetBytes: try size("ramBudget", ramBudget),
            diskBudgetBytes: try diskBudget.flatMap { $0.isEmpty ? nil : try size("diskBudget", $0) },
            diskCodec: codec,
            arenaBytes: try size("arenaSize", arenaSize),
            pageTokens: pageTokens,
            ioQueueDepth: ioQueueDepth)
    }
}
