import KVTierCore

/// A tenant's named sequence: the tokens of one model's conversation or job, resumable at its
/// exact token. Its pages are the hash-chain pages of `tokens` (whole pages plus a shorter last
/// page), shared with every other sequence that has the same prefix.
public struct Session: Sendable, Equatable {
    public var tenant: TenantID
    public var name: String
    public var modelID: UInt64
    public var tokens: [UInt32]
    /// Pinned: kept in RAM, never expired, never evicted from disk by the disk budget.
    public var pinned: Bool
    /// Seconds after the last use when the session is forgotten; 0 for never.
    public var ttlSeconds: UInt32
    /// Wall-clock time of the last put, fork or resume, in microseconds since the Unix epoch.
    public var lastUsedMicros: UInt64

    public init(tenant: TenantID, name: String, modelID: UInt64, tokens: [UInt32], pinned: Bool = false,
                ttlSeconds: UInt32 = 0, lastUsedMicros: UInt64) {
        self.tenant = tenant
        self.name = name
        self.modelID = modelID
        self.tokens = tokens
        self.pinned = pinned
        self.ttlSeconds = ttlSeconds
        self.lastUsedMicros = lastUsedMicros
    }

    public var id: SessionID { SessionID(tenant: tenant, name: name) }

    /// Whether the TTL has run out at wall-clock time `now` (pinned sessions never expire).
    public func isExpired(atWallMicros now: UInt64) -> Bool {
        guard !pinned, ttlSeconds > 0 else { return false }
        return now > lastUsedMicros &+ UInt64(ttlSeconds) * 1_000_000
    }

    /// A session name: 1 to `maxNameBytes` bytes of UTF-8 without control characters (`Name`).
    public static func validate(name: String) throws(StoreError) {
        try Name.validate(name, kind: "session")
    }

    public static let maxNameBytes = Name.maxBytes
    /// Most sessions one tenant may hold; a put naming a new session beyond it is refused.
    public static let maxPerTenant = 65_536
    /// Most tokens one tenant's sessions may hold together (256 MiB of token ids in memory and
    /// in the catalog); a put or fork beyond it is refused.
    public static let maxTokensPerTenant = 1 << 26
}

/// A session's identity: names are per tenant.
public struct SessionID: Hashable, Sendable, CustomStringConvertible {
    public var tenant: TenantID
    public var name: String

    public init(tenant: TenantID, name: String) {
        self.tenant = tenant
        self.name = name
    }

    public var description: String { "\(tenant)/\(name)" }
}
