import KVTierSystem

/// Where the remote tier's Redis or Valkey server is (`remoteURL`):
/// `redis://[user@]host[:port][/db]` (port 6379 and database 0 by default; an IPv6 host in
/// brackets) or `unix:///path/to/redis.sock[?db=N]`. The password never appears here (it would
/// show in logs, `--print-config` and `ps`): it comes from `remotePasswordFile` or
/// `KVTIER_REMOTE_PASSWORD`. `rediss://` (TLS) is refused: kvtierd carries no TLS library.
public struct RedisURL: Sendable, Equatable, CustomStringConvertible {
    public var endpoint: StreamEndpoint
    public var database: Int
    /// The ACL user for AUTH (Redis 6+); nil: the default user.
    public var username: String?

    public static let defaultPort: UInt16 = 6379
    /// Databases a server may number (Redis's `databases` defaults to 16; this only bounds input).
    public static let maxDatabase = 1 << 20

    public init(endpoint: StreamEndpoint, database: Int = 0, username: String? = nil) {
        self.endpoint = endpoint
        self.database = database
        self.username = username
    }

    public var description: String {
        let user = username.map { "\($0)@" } ?? ""
        switch endpoint {
        case .tcp(let host, let port):
            let shown = host.contains(":") ? "[\(host)]" : host
            return "redis://\(user)\(shown):\(port)/\(database)"
        case .unix(let path):
            return "unix://\(user)\(path)?db=\(database)"
        }
    }

    /// Why a URL was refused, and what to write instead.
    public struct Invalid: Error, Sendable, CustomStringConvertible {
        public var reason: String
        public var description: String { reason }
    }

    public static func parse(_ text: String) throws(Invalid) -> RedisURL {
        if text.hasPrefix("rediss://") {
            throw Invalid(reason: "TLS (rediss://) is not supported: kvtierd has no TLS library. Reach Redis over a Unix socket (unix:///path), on a private network, or through a local TLS tunnel (stunnel, spiped, an SSH forward) with redis://127.0.0.1:PORT")
        }
        guard !text.contains("%") else { throw Invalid(reason: "percent-encoding is not supported in remoteURL") }
        guard !text.contains(where: { $0.isWhitespace || $0.asciiValue.map { $0 < 32 } ?? true }) else {
            throw Invalid(reason: "remoteURL holds spaces, control or non-ASCII characters")
        }
        if text.hasPrefix("unix://") { return try parseUnix(String(text.dropFirst("unix://".count))) }
        guard text.hasPrefix("redis://") else {
            throw Invalid(reason: "use redis://[user@]host[:port][/db] or unix:///path/to/redis.sock[?db=N]")
        }
        var rest = Substring(text.dropFirst("redis://".count))
        let username = try takeUser(&rest)
        var database = 0
        if let slash = rest.firstIndex(of: "/") {
            database = try parseDatabase(rest[rest.index(after: slash)...])
            rest = rest[..<slash]
        }
        var host: Substring
        var port = defaultPort
        if rest.hasPrefix("[") {
            guard let close = rest.firstIndex(of: "]") else { throw Invalid(reason: "an IPv6 host needs its closing ]") }
            host = rest[rest.index(after: rest.startIndex)..<close]
            let after = rest[rest.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { throw Invalid(reason: "expected :PORT after the IPv6 host") }
                port = try parsePort(after.dropFirst())
            }
        } else if let colon = rest.firstIndex(of: ":") {
            host = rest[..<colon]
            port = try parsePort(rest[rest.index(after: colon)...])
        } else {
            host = rest
        }
        guard !host.isEmpty else { throw Invalid(reason: "remoteURL names no host") }
        guard host.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "." || $0 == "-" || $0 == ":" || $0 == "_" }) else {
            throw Invalid(reason: "'\(host)' is not a host name or address")
        }
        return RedisURL(endpoint: .tcp(host: String(host), port: port), database: database, username: username)
    }

    private static func parseUnix(_ text: String) throws(Invalid) -> RedisURL {
        var rest = Substring(text)
        let username = try takeUser(&rest)
        var database = 0
        if let question = rest.firstIndex(of: "?") {
            let query = rest[rest.index(after: question)...]
            guard query.hasPrefix("db=") else { throw Invalid(reason: "the only query a unix:// URL takes is ?db=N") }
            database = try parseDatabase(query.dropFirst(3))
            rest = rest[..<question]
        }
        guard rest.hasPrefix("/") else { throw Invalid(reason: "a unix:// URL needs an absolute path: unix:///run/redis/redis.sock") }
        guard rest.utf8.count <= UnixSocketAddress.maxPathBytes else {
            throw Invalid(reason: "the socket path is longer than \(UnixSocketAddress.maxPathBytes) bytes (what sun_path holds)")
        }
        return RedisURL(endpoint: .unix(path: String(rest)), database: database, username: username)
    }

    /// Takes `user@` off the front; a `user:password@` is refused.
    private static func takeUser(_ rest: inout Substring) throws(Invalid) -> String? {
        guard let at = rest.firstIndex(of: "@") else { return nil }
        let user = rest[..<at]
        guard !user.contains(":") else {
            throw Invalid(reason: "remoteURL must not carry a password (it would show in logs and --print-config): put it in remotePasswordFile or the KVTIER_REMOTE_PASSWORD environment variable")
        }
        guard !user.isEmpty, user.allSatisfy({ $0.isLetter || $0.isNumber || "-_.".contains($0) }) else {
            throw Invalid(reason: "'\(user)' is not a user name (letters, digits, - _ .)")
        }
        rest = rest[rest.index(after: at)...]
        return String(user)
    }

    private static func parsePort(_ text: Substring) throws(Invalid) -> UInt16 {
        guard let port = UInt16(text), port > 0 else { throw Invalid(reason: "'\(text)' is not a port (1-65535)") }
        return port
    }

    private static func parseDatabase(_ text: Substring) throws(Invalid) -> Int {
        if text.isEmpty { return 0 }
        guard let database = Int(text), (0...maxDatabase).contains(database) else {
            throw Invalid(reason: "'\(text)' is not a database number (0-\(maxDatabase))")
        }
        return database
    }
}
