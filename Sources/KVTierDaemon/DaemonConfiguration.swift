#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import KVTierCodec
import KVTierCore
import KVTierProtocol
import KVTierRemote
import KVTierServer
import KVTierStore
import Logging

/// kvtierd's settings: embedded defaults, then a JSON config file (`--config`), then flags.
/// Invalid values stop the daemon at start with a message naming the key and what is allowed;
/// so do unknown keys (a misspelt key would otherwise be silently ignored). Every key is
/// documented with its default in docs/configuration.md.
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
    /// Most bytes of page files one tenant may hold; empty: no quota besides `diskBudget`.
    /// Default: no quota.
    public var diskTenantQuota: String?
    /// Codec of pages written to disk. Default k4v4.
    public var diskCodec: String = "k4v4"
    /// How each model's disk codec is chosen: `"fixed"` (diskCodec), `"auto"`, or an object
    /// (`CodecPolicySetting`). Default fixed.
    public var codecPolicy = CodecPolicySetting()
    /// Most virtual size of each tenant's page arena (sized tenantRAMQuota + 25%). Default 64GiB.
    public var arenaSize: String = "64GiB"
    /// Most bytes of pages one tenant may hold in RAM, leased ones included. Default: ramBudget.
    public var tenantRAMQuota: String?
    /// Size of each tenant's staging arena (client-writable shared memory for PUTs). Default 256MiB.
    public var stagingSize: String = "256MiB"
    /// RAM the background evictor keeps free below ramBudget and each tenant's quota, so puts
    /// find room without waiting for disk writes. Default: an eighth of the budget, at least
    /// 64MiB, at most half.
    public var evictionHeadroom: String?
    /// Tokens per page for models that do not ask for another size. Default 256.
    public var pageTokens: Int = Limits.defaultPageTokens
    /// io_uring queue depth of disk reads. Default 64.
    public var ioQueueDepth: Int = 64
    /// Least severe log level written. Default info. SIGHUP reloads it.
    public var logLevel: String = "info"
    /// `HOST:PORT` of the Prometheus endpoint (`GET /metrics`); nil or empty: off. Default off.
    public var metricsListen: String?
    /// Whether `metricsListen` may name a non-loopback address. Default false.
    public var metricsAllowNonLoopback: Bool = false
    /// Unix groups (names or numeric gids) whose members share one tenant: a client whose
    /// primary group (as SO_PEERCRED reports it) is listed gets the group's tenant instead of its
    /// uid's. Default none.
    public var sharedTenantGroups: [String] = []
    // Transport limits (docs/security.md): defaults are `ServerConfiguration`'s.
    /// Connections served at once. Default 1024.
    public var maxConnections: Int = ServerConfiguration().maxConnections
    /// Connections one uid may hold at once. Default 64.
    public var maxConnectionsPerUID: Int = ServerConfiguration().maxConnectionsPerUID
    /// Seconds a connection may wait before its HELLO. Default 10.
    public var handshakeTimeoutSeconds: Int = Int(ServerConfiguration().handshakeTimeout.components.seconds)
    /// Seconds a connection may idle between frames after HELLO. Default 600.
    public var idleTimeoutSeconds: Int = Int(ServerConfiguration().idleTimeout.components.seconds)
    /// Bytes of frames being assembled over all connections. Default 512MiB.
    public var maxBufferedFrameBytes: String = "\(ByteCount(ServerConfiguration().maxBufferedFrameBytes))"
    /// Of those, the most one uid's connections may hold. Default 128MiB.
    public var maxBufferedFrameBytesPerUID: String = "\(ByteCount(ServerConfiguration().maxBufferedFrameBytesPerUID))"
    /// Most models one tenant may register while the daemon runs. Default 256.
    public var maxModelsPerTenant: Int = 256
    // The remote tier (docs/configuration.md, "Remote tier"): every key but remoteURL applies
    // only with it.
    /// Redis or Valkey shared by several hosts' daemons: `redis://[user@]host[:port][/db]` or
    /// `unix:///path[?db=N]`; nil or empty: no remote tier. Default none.
    public var remoteURL: String?
    /// File holding the Redis password (AUTH); nil: `KVTIER_REMOTE_PASSWORD`, else no AUTH.
    public var remotePasswordFile: String?
    /// File holding the deployment's 32-byte page key; nil: `KVTIER_REMOTE_KEY`. Required.
    public var remoteKeyFile: String?
    /// First part of every Redis key. Default "kvtier".
    public var remoteKeyPrefix: String = "kvtier"
    /// Which pages go remote: "evicted", "durable" or "all". Default "evicted".
    public var remotePages: String = RemotePages.evicted.rawValue
    /// Expiry of each remote page, seconds; 0: none. Default 86400.
    public var remoteTTLSeconds: Int = 86_400
    /// Most bytes of pages this daemon keeps in Redis; nil: no limit but the TTL. Default none.
    public var remoteBudget: String?
    /// The longest one remote request may take, milliseconds. Default 250.
    public var remoteTimeoutMillis: Int = 250
    /// Most bytes of page records waiting to be written to Redis. Default 256MiB.
    public var remoteQueueSize: String = "256MiB"
    /// Connections for remote reads. Default 4.
    public var remoteConnections: Int = 4

    /// Keys that SIGHUP applies without a restart; a change to any other key is logged and
    /// waits for the next start.
    public static let reloadableKeys: Set<String> = ["logLevel"]

    enum CodingKeys: String, CodingKey, CaseIterable {
        case socket, stateDir, ramBudget, diskBudget, diskCodec, codecPolicy, arenaSize, tenantRAMQuota, stagingSize, evictionHeadroom, pageTokens, ioQueueDepth
        case logLevel, metricsListen, metricsAllowNonLoopback, sharedTenantGroups, diskTenantQuota
        case maxConnections, maxConnectionsPerUID, handshakeTimeoutSeconds, idleTimeoutSeconds
        case maxBufferedFrameBytes, maxBufferedFrameBytesPerUID, maxModelsPerTenant
        case remoteURL, remotePasswordFile, remoteKeyFile, remoteKeyPrefix, remotePages, remoteTTLSeconds, remoteBudget
        case remoteTimeoutMillis, remoteQueueSize, remoteConnections
    }

    /// Every key a config file may hold.
    public static var keys: [String] { CodingKeys.allCases.map(\.rawValue) }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: AnyKey.self)
        let known = Set(Self.keys)
        if let unknown = container.allKeys.map(\.stringValue).sorted().first(where: { !known.contains($0) }) {
            throw Invalid(key: unknown, value: "(present)", allowed: "one of the keys " + Self.keys.joined(separator: ", "))
        }
        func value<T: Decodable>(_ key: CodingKeys, _ type: T.Type, _ what: String) throws -> T? {
            do { return try container.decodeIfPresent(T.self, forKey: AnyKey(key.rawValue)) } catch {
                throw Invalid(key: key.rawValue, value: "(wrong type)", allowed: what)
            }
        }
        socket = try value(.socket, String.self, "a string: the socket path")
        stateDir = try value(.stateDir, String.self, "a string: the state directory")
        ramBudget = try value(.ramBudget, String.self, "a size string such as \"8GiB\"") ?? ramBudget
        diskBudget = try value(.diskBudget, String.self, "a size string such as \"100GiB\", or empty for no limit")
        diskTenantQuota = try value(.diskTenantQuota, String.self, "a size string such as \"20GiB\", or empty for no quota")
        diskCodec = try value(.diskCodec, String.self, "a codec name string") ?? diskCodec
        do {
            codecPolicy = try container.decodeIfPresent(CodecPolicySetting.self, forKey: AnyKey(CodingKeys.codecPolicy.rawValue)) ?? codecPolicy
        } catch let invalid as Invalid { throw invalid } catch {
            throw Invalid(key: "codecPolicy", value: "(wrong type)", allowed: CodecPolicySetting.allowed)
        }
        arenaSize = try value(.arenaSize, String.self, "a size string such as \"64GiB\"") ?? arenaSize
        tenantRAMQuota = try value(.tenantRAMQuota, String.self, "a size string such as \"2GiB\"")
        evictionHeadroom = try value(.evictionHeadroom, String.self, "a size string such as \"256MiB\"") ?? evictionHeadroom
        stagingSize = try value(.stagingSize, String.self, "a size string such as \"256MiB\"") ?? stagingSize
        pageTokens = try value(.pageTokens, Int.self, "an integer") ?? pageTokens
        ioQueueDepth = try value(.ioQueueDepth, Int.self, "an integer") ?? ioQueueDepth
        maxModelsPerTenant = try value(.maxModelsPerTenant, Int.self, "an integer") ?? maxModelsPerTenant
        logLevel = try value(.logLevel, String.self, "a string: " + Self.logLevels.joined(separator: ", ")) ?? logLevel
        metricsListen = try value(.metricsListen, String.self, "a string HOST:PORT such as \"127.0.0.1:9464\"")
        metricsAllowNonLoopback = try value(.metricsAllowNonLoopback, Bool.self, "true or false") ?? metricsAllowNonLoopback
        sharedTenantGroups = try value(.sharedTenantGroups, [String].self, "a list of group names or numeric gids") ?? sharedTenantGroups
        maxConnections = try value(.maxConnections, Int.self, "an integer") ?? maxConnections
        maxConnectionsPerUID = try value(.maxConnectionsPerUID, Int.self, "an integer") ?? maxConnectionsPerUID
        handshakeTimeoutSeconds = try value(.handshakeTimeoutSeconds, Int.self, "an integer: seconds") ?? handshakeTimeoutSeconds
        idleTimeoutSeconds = try value(.idleTimeoutSeconds, Int.self, "an integer: seconds") ?? idleTimeoutSeconds
        maxBufferedFrameBytes = try value(.maxBufferedFrameBytes, String.self, "a size string such as \"512MiB\"") ?? maxBufferedFrameBytes
        maxBufferedFrameBytesPerUID = try value(.maxBufferedFrameBytesPerUID, String.self, "a size string such as \"128MiB\"") ?? maxBufferedFrameBytesPerUID
        remoteURL = try value(.remoteURL, String.self, "a string such as \"redis://cache.internal:6379/0\" or \"unix:///run/redis/redis.sock\"")
        remotePasswordFile = try value(.remotePasswordFile, String.self, "a string: the path of a file holding the Redis password")
        remoteKeyFile = try value(.remoteKeyFile, String.self, "a string: the path of a file holding the 32-byte deployment key")
        remoteKeyPrefix = try value(.remoteKeyPrefix, String.self, "a string such as \"kvtier\"") ?? remoteKeyPrefix
        remotePages = try value(.remotePages, String.self, "a string: " + RemotePages.allCases.map(\.rawValue).joined(separator: ", ")) ?? remotePages
        remoteTTLSeconds = try value(.remoteTTLSeconds, Int.self, "an integer: seconds") ?? remoteTTLSeconds
        remoteBudget = try value(.remoteBudget, String.self, "a size string such as \"50GiB\", or empty for no limit")
        remoteTimeoutMillis = try value(.remoteTimeoutMillis, Int.self, "an integer: milliseconds") ?? remoteTimeoutMillis
        remoteQueueSize = try value(.remoteQueueSize, String.self, "a size string such as \"256MiB\"") ?? remoteQueueSize
        remoteConnections = try value(.remoteConnections, Int.self, "an integer") ?? remoteConnections
    }

    struct AnyKey: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(_ string: String) { stringValue = string }
        init?(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    /// Log levels by name, least severe first.
    public static let logLevels = Logger.Level.allCases.map(\.rawValue)

    public struct Invalid: Error, CustomStringConvertible {
        public var key: String
        public var value: String
        public var allowed: String
        public var description: String { "configuration key '\(key)' has value '\(value)'; allowed: \(allowed)" }
    }

    /// Where the Prometheus endpoint listens: a numeric IPv4 or IPv6 address and a port (0: any
    /// free port, logged at start).
    public struct MetricsEndpoint: Equatable, Sendable, CustomStringConvertible {
        public var host: String
        public var port: UInt16
        public var isLoopback: Bool
        public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }

        /// Parses `127.0.0.1:9464`, `[::1]:9464` or `localhost:9464`; nil when malformed.
        public static func parse(_ text: String) -> MetricsEndpoint? {
            guard let colon = text.lastIndex(of: ":"), let port = UInt16(text[text.index(after: colon)...]) else { return nil }
            var host = String(text[..<colon])
            if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
            if host == "localhost" { host = "127.0.0.1" }
            var v4 = in_addr()
            var v6 = in6_addr()
            if inet_pton(AF_INET, host, &v4) == 1 {
                return MetricsEndpoint(host: host, port: port, isLoopback: UInt32(bigEndian: v4.s_addr) >> 24 == 127)
            }
            if !text.hasPrefix("[") && host.contains(":") { return nil }  // IPv6 needs brackets.
            if inet_pton(AF_INET6, host, &v6) == 1 {
                let loopback = withUnsafeBytes(of: &v6) { $0.elementsEqual([UInt8](repeating: 0, count: 15) + [1]) }
                return MetricsEndpoint(host: host, port: port, isLoopback: loopback)
            }
            return nil
        }
    }

    /// The resolved values the daemon runs with.
    public struct Resolved: Equatable, Sendable {
        public var socket: String
        public var stateDir: String
        public var ramBudgetBytes: Int
        public var diskBudgetBytes: Int?
        public var diskTenantQuotaBytes: Int?
        public var diskCodec: Codec
        /// `codecPolicy`.
        public var codecPolicy = CodecPolicy.Configuration()
        public var arenaBytes: Int
        public var tenantRAMQuotaBytes: Int
        public var stagingBytes: Int
        public var pageTokens: Int
        public var ioQueueDepth: Int
        public var logLevel: Logger.Level
        public var metricsListen: MetricsEndpoint?
        public var metricsAllowNonLoopback: Bool
        /// Gids whose members share a tenant (`sharedTenantGroups`, names resolved).
        public var sharedTenantGids: [UInt32] = []
        /// The transport's limits (`maxConnections` … `maxBufferedFrameBytesPerUID`).
        public var transport = TransportLimits()

        /// The transport limits as the config file names them.
        public struct TransportLimits: Equatable, Sendable {
            public var maxConnections = ServerConfiguration().maxConnections
            public var maxConnectionsPerUID = ServerConfiguration().maxConnectionsPerUID
            public var handshakeTimeoutSeconds = Int(ServerConfiguration().handshakeTimeout.components.seconds)
            public var idleTimeoutSeconds = Int(ServerConfiguration().idleTimeout.components.seconds)
            public var maxBufferedFrameBytes = ServerConfiguration().maxBufferedFrameBytes
            public var maxBufferedFrameBytesPerUID = ServerConfiguration().maxBufferedFrameBytesPerUID

            /// The server's configuration with these limits.
            public var serverConfiguration: ServerConfiguration {
                var server = ServerConfiguration()
                server.maxConnections = maxConnections
                server.maxConnectionsPerUID = maxConnectionsPerUID
                server.handshakeTimeout = .seconds(handshakeTimeoutSeconds)
                server.idleTimeout = .seconds(idleTimeoutSeconds)
                server.maxBufferedFrameBytes = maxBufferedFrameBytes
                server.maxBufferedFrameBytesPerUID = maxBufferedFrameBytesPerUID
                return server
            }
        }
        /// `maxModelsPerTenant`.
        public var maxModelsPerTenant = 256
        /// `evictionHeadroom`; nil: the store's default (`TieredStore.headroom(below:)`).
        public var evictionHeadroomBytes: Int?
        /// The remote tier (`remoteURL` and the keys after it); nil: none.
        public var remote: Remote?

        /// The remote tier's settings. Its secrets are read at start (`Remote.secrets`), never
        /// kept here, so they appear neither in `--print-config` nor in a comparison.
        public struct Remote: Equatable, Sendable {
            public var url: RedisURL
            public var passwordFile: String?
            public var keyFile: String?
            public var keyPrefix = "kvtier"
            public var pages = RemotePages.evicted
            public var ttlSeconds = 86_400
            public var budgetBytes: Int?
            public var timeoutMillis = 250
            public var queueBytes = 256 << 20
            public var connections = 4

            public init(url: RedisURL) { self.url = url }

            /// The deployment key and the password, from their files or the environment.
            public func secrets(environment: [String: String]) throws -> (key: DigestKey, password: String?) {
                let key: DigestKey
                do { key = try RemoteSecrets.key(file: keyFile, environment: environment) } catch {
                    throw Invalid(key: "remoteKeyFile", value: keyFile ?? "(unset, and no \(RemoteSecrets.keyEnvironment))", allowed: error.reason)
                }
                do { return (key, try RemoteSecrets.password(file: passwordFile, environment: environment)) } catch {
                    throw Invalid(key: "remotePasswordFile", value: passwordFile ?? "", allowed: error.reason)
                }
            }

            /// The tier's configuration with these settings.
            public func tierConfiguration(key: DigestKey, password: String?) -> RedisRemoteTier.Configuration {
                var tier = RedisRemoteTier.Configuration(url: url, password: password, key: key)
                tier.keyPrefix = keyPrefix
                tier.ttlSeconds = ttlSeconds
                tier.budgetBytes = budgetBytes
                tier.timeoutMillis = timeoutMillis
                tier.queueBytes = queueBytes
                tier.connections = connections
                return tier
            }

            /// The settings as config keys and JSON values (`--print-config`).
            var fields: [(String, String)] {
                func quoted(_ text: String?) -> String { text.map { "\"\($0)\"" } ?? "null" }
                return [
                    ("remoteURL", quoted(url.description)), ("remotePasswordFile", quoted(passwordFile)), ("remoteKeyFile", quoted(keyFile)),
                    ("remoteKeyPrefix", quoted(keyPrefix)), ("remotePages", quoted(pages.rawValue)), ("remoteTTLSeconds", "\(ttlSeconds)"),
                    ("remoteBudget", quoted(budgetBytes.map { "\(ByteCount($0))" })), ("remoteTimeoutMillis", "\(timeoutMillis)"),
                    ("remoteQueueSize", quoted("\(ByteCount(queueBytes))")), ("remoteConnections", "\(connections)"),
                ]
            }
        }

        /// The tenant of a peer: its primary group's shared tenant (`TenantID.group`) when that
        /// group is listed, else its uid. Nil (refused) for a uid that would collide with group
        /// tenants (2^31 and above) while groups are shared.
        public func tenant(uid: UInt32, gid: UInt32) -> TenantID? {
            if sharedTenantGids.contains(gid) { return TenantID.group(gid) }
            if !sharedTenantGids.isEmpty, uid >= TenantID.groupBit { return nil }
            return TenantID(uid)
        }

        /// The effective configuration as a JSON object, with the config file's key names
        /// (`kvtierd --print-config`).
        public var json: String {
            func quoted(_ text: String) -> String {
                var out = "\""
                for character in text {
                    switch character {
                    case "\"": out += "\\\""
                    case "\\": out += "\\\\"
                    default: out.append(character)
                    }
                }
                return out + "\""
            }
            let fields: [(String, String)] = [
                ("socket", quoted(socket)), ("stateDir", quoted(stateDir)), ("ramBudget", quoted("\(ByteCount(ramBudgetBytes))")),
                ("diskBudget", diskBudgetBytes.map { quoted("\(ByteCount($0))") } ?? "null"),
                ("diskTenantQuota", diskTenantQuotaBytes.map { quoted("\(ByteCount($0))") } ?? "null"),
                ("diskCodec", quoted("\(diskCodec)")), ("codecPolicy", CodecPolicySetting.json(codecPolicy)),
                ("arenaSize", quoted("\(ByteCount(arenaBytes))")),
                ("tenantRAMQuota", quoted("\(ByteCount(tenantRAMQuotaBytes))")), ("stagingSize", quoted("\(ByteCount(stagingBytes))")),
                ("pageTokens", "\(pageTokens)"), ("ioQueueDepth", "\(ioQueueDepth)"), ("logLevel", quoted(logLevel.rawValue)),
                ("metricsListen", metricsListen.map { quoted("\($0)") } ?? "null"),
                ("metricsAllowNonLoopback", "\(metricsAllowNonLoopback)"),
                ("sharedTenantGroups", "[" + sharedTenantGids.map { quoted("\($0)") }.joined(separator: ", ") + "]"),
                ("maxConnections", "\(transport.maxConnections)"), ("maxConnectionsPerUID", "\(transport.maxConnectionsPerUID)"),
                ("handshakeTimeoutSeconds", "\(transport.handshakeTimeoutSeconds)"), ("idleTimeoutSeconds", "\(transport.idleTimeoutSeconds)"),
                ("maxBufferedFrameBytes", quoted("\(ByteCount(transport.maxBufferedFrameBytes))")),
                ("maxBufferedFrameBytesPerUID", quoted("\(ByteCount(transport.maxBufferedFrameBytesPerUID))")),
                ("maxModelsPerTenant", "\(maxModelsPerTenant)"),
                ("evictionHeadroom", evictionHeadroomBytes.map { quoted("\(ByteCount($0))") } ?? "null"),
            ] + (remote?.fields ?? [("remoteURL", "null")])
            return "{" + fields.map { "\(quoted($0.0)): \($0.1)" }.joined(separator: ", ") + "}"
        }

        /// Config keys whose values differ between `self` and `other`.
        public func changedKeys(comparedTo other: Resolved) -> [String] {
            var keys: [String] = []
            if socket != other.socket { keys.append("socket") }
            if stateDir != other.stateDir { keys.append("stateDir") }
            if ramBudgetBytes != other.ramBudgetBytes { keys.append("ramBudget") }
            if diskBudgetBytes != other.diskBudgetBytes { keys.append("diskBudget") }
            if diskTenantQuotaBytes != other.diskTenantQuotaBytes { keys.append("diskTenantQuota") }
            if diskCodec != other.diskCodec { keys.append("diskCodec") }
            if codecPolicy != other.codecPolicy { keys.append("codecPolicy") }
            if arenaBytes != other.arenaBytes { keys.append("arenaSize") }
            if tenantRAMQuotaBytes != other.tenantRAMQuotaBytes { keys.append("tenantRAMQuota") }
            if stagingBytes != other.stagingBytes { keys.append("stagingSize") }
            if pageTokens != other.pageTokens { keys.append("pageTokens") }
            if ioQueueDepth != other.ioQueueDepth { keys.append("ioQueueDepth") }
            if logLevel != other.logLevel { keys.append("logLevel") }
            if metricsListen != other.metricsListen { keys.append("metricsListen") }
            if metricsAllowNonLoopback != other.metricsAllowNonLoopback { keys.append("metricsAllowNonLoopback") }
            if sharedTenantGids != other.sharedTenantGids { keys.append("sharedTenantGroups") }
            let (t, o) = (transport, other.transport)
            if t.maxConnections != o.maxConnections { keys.append("maxConnections") }
            if t.maxConnectionsPerUID != o.maxConnectionsPerUID { keys.append("maxConnectionsPerUID") }
            if t.handshakeTimeoutSeconds != o.handshakeTimeoutSeconds { keys.append("handshakeTimeoutSeconds") }
            if t.idleTimeoutSeconds != o.idleTimeoutSeconds { keys.append("idleTimeoutSeconds") }
            if t.maxBufferedFrameBytes != o.maxBufferedFrameBytes { keys.append("maxBufferedFrameBytes") }
            if t.maxBufferedFrameBytesPerUID != o.maxBufferedFrameBytesPerUID { keys.append("maxBufferedFrameBytesPerUID") }
            if maxModelsPerTenant != other.maxModelsPerTenant { keys.append("maxModelsPerTenant") }
            if evictionHeadroomBytes != other.evictionHeadroomBytes { keys.append("evictionHeadroom") }
            let mine = remote?.fields ?? [("remoteURL", "null")], theirs = other.remote?.fields ?? [("remoteURL", "null")]
            for key in Set(mine.map(\.0) + theirs.map(\.0)).sorted() where mine.first(where: { $0.0 == key })?.1 != theirs.first(where: { $0.0 == key })?.1 {
                keys.append(key)
            }
            return keys
        }
    }

    /// Command-line flags, which win over the config file.
    public struct Overrides: Sendable {
        public var socket, stateDir, ramBudget, diskBudget, diskCodec, logLevel, metricsListen: String?

        public init(socket: String? = nil, stateDir: String? = nil, ramBudget: String? = nil, diskBudget: String? = nil,
                    diskCodec: String? = nil, logLevel: String? = nil, metricsListen: String? = nil) {
            (self.socket, self.stateDir, self.ramBudget, self.diskBudget) = (socket, stateDir, ramBudget, diskBudget)
            (self.diskCodec, self.logLevel, self.metricsListen) = (diskCodec, logLevel, metricsListen)
        }

        public func apply(to settings: inout DaemonConfiguration) {
            if let socket { settings.socket = socket }
            if let stateDir { settings.stateDir = stateDir }
            if let ramBudget { settings.ramBudget = ramBudget }
            if let diskBudget { settings.diskBudget = diskBudget }
            if let diskCodec { settings.diskCodec = diskCodec }
            if let logLevel { settings.logLevel = logLevel }
            if let metricsListen { settings.metricsListen = metricsListen }
        }
    }

    public static func load(file path: String) throws -> DaemonConfiguration {
        let data: Data
        do { data = try Data(contentsOf: URL(fileURLWithPath: path)) } catch {
            throw Invalid(key: "--config", value: path, allowed: "a readable JSON file (\(error))")
        }
        do { return try JSONDecoder().decode(DaemonConfiguration.self, from: data) } catch let invalid as Invalid {
            throw invalid
        } catch {
            throw Invalid(key: "--config", value: path, allowed: "a JSON object with the keys \(keys.joined(separator: ", ")) (\(error))")
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
        guard (1...65_536).contains(maxModelsPerTenant) else {
            throw Invalid(key: "maxModelsPerTenant", value: "\(maxModelsPerTenant)", allowed: "1...65536")
        }
        guard let level = Logger.Level(rawValue: logLevel) else {
            throw Invalid(key: "logLevel", value: logLevel, allowed: Self.logLevels.joined(separator: ", "))
        }
        var metrics: MetricsEndpoint?
        if let text = metricsListen, !text.isEmpty {
            guard let endpoint = MetricsEndpoint.parse(text) else {
                throw Invalid(key: "metricsListen", value: text,
                              allowed: "HOST:PORT with a numeric address, e.g. 127.0.0.1:9464, [::1]:9464 or localhost:9464; empty for off")
            }
            guard endpoint.isLoopback || metricsAllowNonLoopback else {
                throw Invalid(key: "metricsListen", value: text,
                              allowed: "a loopback address (127.0.0.0/8 or ::1) unless metricsAllowNonLoopback is true")
            }
            metrics = endpoint
        }
        if let socket, socket.isEmpty {
            throw Invalid(key: "socket", value: socket, allowed: "a path such as /run/kvtier/kvtierd.sock; leave the key out for the default")
        }
        if let stateDir, stateDir.isEmpty {
            throw Invalid(key: "stateDir", value: stateDir, allowed: "a path such as /var/lib/kvtier; leave the key out for the default")
        }
        let state = try stateDir ?? KVTierPaths.defaultStateDirectory()
        var gids: [UInt32] = []
        for group in sharedTenantGroups {
            if let gid = UInt32(group), gid < TenantID.groupBit {
                gids.append(gid)
            } else if let entry = getgrnam(group) {
                gids.append(entry.pointee.gr_gid)
            } else {
                throw Invalid(key: "sharedTenantGroups", value: group, allowed: "names of groups that exist on this host, or numeric gids below 2^31")
            }
        }
        let ramBudgetBytes = try size("ramBudget", ramBudget)
        let quota = try tenantRAMQuota.map { try size("tenantRAMQuota", $0) } ?? ramBudgetBytes
        guard quota <= ramBudgetBytes else {
            throw Invalid(key: "tenantRAMQuota", value: tenantRAMQuota ?? "", allowed: "a size no larger than ramBudget (\(ByteCount(ramBudgetBytes)))")
        }
        let staging = try size("stagingSize", stagingSize)
        guard staging >= 1 << 20, staging <= 64 << 30 else {
            throw Invalid(key: "stagingSize", value: stagingSize, allowed: "a size from 1MiB to 64GiB")
        }
        var resolved = Resolved(
            socket: try socket ?? KVTierPaths.defaultSocketPath(),
            stateDir: state,
            ramBudgetBytes: ramBudgetBytes,
            diskBudgetBytes: try diskBudget.flatMap { $0.isEmpty ? nil : try size("diskBudget", $0) },
            diskTenantQuotaBytes: try diskTenantQuota.flatMap { $0.isEmpty ? nil : try size("diskTenantQuota", $0) },
            diskCodec: codec,
            arenaBytes: try size("arenaSize", arenaSize),
            tenantRAMQuotaBytes: quota,
            stagingBytes: staging,
            pageTokens: pageTokens,
            ioQueueDepth: ioQueueDepth,
            logLevel: level,
            metricsListen: metrics,
            metricsAllowNonLoopback: metricsAllowNonLoopback)
        resolved.sharedTenantGids = gids
        resolved.transport = try resolvedTransport()
        resolved.maxModelsPerTenant = maxModelsPerTenant
        resolved.codecPolicy = try codecPolicy.resolved()
        if let evictionHeadroom {
            let headroom = try size("evictionHeadroom", evictionHeadroom)
            guard headroom <= ramBudgetBytes / 2 else {
                throw Invalid(key: "evictionHeadroom", value: evictionHeadroom, allowed: "a size up to half of ramBudget (\(ByteCount(ramBudgetBytes / 2)))")
            }
            resolved.evictionHeadroomBytes = headroom
        }
        resolved.remote = try resolvedRemote()
        return resolved
    }

    /// The remote tier's keys checked (its secrets are read at start, by `Remote.secrets`).
    func resolvedRemote() throws -> Resolved.Remote? {
        guard let text = remoteURL, !text.isEmpty else { return nil }
        let url: RedisURL
        do { url = try RedisURL.parse(text) } catch { throw Invalid(key: "remoteURL", value: text, allowed: error.reason) }
        var remote = Resolved.Remote(url: url)
        remote.passwordFile = remotePasswordFile.flatMap { $0.isEmpty ? nil : $0 }
        remote.keyFile = remoteKeyFile.flatMap { $0.isEmpty ? nil : $0 }
        guard (1...64).contains(remoteKeyPrefix.count), remoteKeyPrefix.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.:".contains($0)) }) else {
            throw Invalid(key: "remoteKeyPrefix", value: remoteKeyPrefix, allowed: "1 to 64 letters, digits, - _ . :")
        }
        remote.keyPrefix = remoteKeyPrefix
        guard let pages = RemotePages(rawValue: remotePages) else {
            throw Invalid(key: "remotePages", value: remotePages, allowed: RemotePages.allCases.map(\.rawValue).joined(separator: ", "))
        }
        remote.pages = pages
        guard (0...315_360_000).contains(remoteTTLSeconds) else {
            throw Invalid(key: "remoteTTLSeconds", value: "\(remoteTTLSeconds)", allowed: "0 (no expiry) to 315360000 (ten years)")
        }
        remote.ttlSeconds = remoteTTLSeconds
        if let budget = remoteBudget, !budget.isEmpty {
            guard let bytes = ByteCount(parsing: budget)?.bytes, bytes > 0 else {
                throw Invalid(key: "remoteBudget", value: budget, allowed: "a size such as 50GiB, or empty for no limit")
            }
            remote.budgetBytes = bytes
        }
        guard (10...60_000).contains(remoteTimeoutMillis) else {
            throw Invalid(key: "remoteTimeoutMillis", value: "\(remoteTimeoutMillis)", allowed: "10...60000")
        }
        remote.timeoutMillis = remoteTimeoutMillis
        guard let queue = ByteCount(parsing: remoteQueueSize)?.bytes, queue >= 1 << 20, queue <= 64 << 30 else {
            throw Invalid(key: "remoteQueueSize", value: remoteQueueSize, allowed: "a size from 1MiB to 64GiB")
        }
        remote.queueBytes = queue
        guard (1...64).contains(remoteConnections) else {
            throw Invalid(key: "remoteConnections", value: "\(remoteConnections)", allowed: "1...64")
        }
        remote.connections = remoteConnections
        return remote
    }

    /// The transport keys checked against each other: a limit that no legal frame or
    /// connection could fit under is refused at start rather than met as a hang.
    func resolvedTransport() throws -> Resolved.TransportLimits {
        var limits = Resolved.TransportLimits()
        let largestFrame = ProtocolLimits.maxInlineBody + ProtocolLimits.frameHeaderBytes
        guard (1...1_000_000).contains(maxConnections) else {
            throw Invalid(key: "maxConnections", value: "\(maxConnections)", allowed: "1...1000000")
        }
        guard (1...maxConnections).contains(maxConnectionsPerUID) else {
            throw Invalid(key: "maxConnectionsPerUID", value: "\(maxConnectionsPerUID)", allowed: "1...maxConnections (\(maxConnections))")
        }
        guard (1...3600).contains(handshakeTimeoutSeconds) else {
            throw Invalid(key: "handshakeTimeoutSeconds", value: "\(handshakeTimeoutSeconds)", allowed: "1...3600")
        }
        guard (1...604_800).contains(idleTimeoutSeconds) else {
            throw Invalid(key: "idleTimeoutSeconds", value: "\(idleTimeoutSeconds)", allowed: "1...604800 (a week)")
        }
        guard let total = ByteCount(parsing: maxBufferedFrameBytes)?.bytes, total >= largestFrame else {
            throw Invalid(key: "maxBufferedFrameBytes", value: maxBufferedFrameBytes,
                          allowed: "a size of at least one whole inline frame (64MiB + 16 bytes), e.g. 512MiB")
        }
        guard let perUID = ByteCount(parsing: maxBufferedFrameBytesPerUID)?.bytes, perUID >= largestFrame, perUID <= total else {
            throw Invalid(key: "maxBufferedFrameBytesPerUID", value: maxBufferedFrameBytesPerUID,
                          allowed: "a size from one whole inline frame (64MiB + 16 bytes) to maxBufferedFrameBytes, e.g. 128MiB")
        }
        limits.maxConnections = maxConnections
        limits.maxConnectionsPerUID = maxConnectionsPerUID
        limits.handshakeTimeoutSeconds = handshakeTimeoutSeconds
        limits.idleTimeoutSeconds = idleTimeoutSeconds
        limits.maxBufferedFrameBytes = total
        limits.maxBufferedFrameBytesPerUID = perUID
        return limits
    }
}
