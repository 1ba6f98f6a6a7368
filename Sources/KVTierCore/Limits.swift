/// Every size limit of KVTier in one place. Inputs beyond them are rejected with an error that
/// names the limit; nothing larger is ever allocated on behalf of a caller.
public enum Limits {
    /// Largest head dimension any codec accepts.
    public static let maxHeadDim = 1024
    /// Largest number of KV heads per layer.
    public static let maxKVHeads = 256
    /// Largest number of tokens in one page.
    public static let maxPageTokens = 16384
    /// Default tokens per page.
    public static let defaultPageTokens = 256
    /// Largest number of layers a model may have.
    public static let maxLayers = 1024
    /// Largest fp16 size of one section (one layer of one page, keys plus values).
    public static let maxSectionBytes = 1 << 30
}

/// Limits of what one client or tenant may hold in the RAM tier (docs/security.md). The
/// store's configuration starts from these; the daemon's configuration may change the ones
/// docs/configuration.md lists.
public enum TenantLimits {
    /// Leases (unreleased GETs and ALLOCs) one connection may hold at once.
    public static let maxLeasesPerConnection = 1024
    /// Leases all connections of one tenant may hold at once.
    public static let maxLeasesPerTenant = 8192
    /// Default size of a tenant's staging arena (client-writable shared memory for PUTs).
    public static let defaultStagingBytes = 256 << 20
    /// Fragmentation slack of a tenant's page arena, in parts per 1024 of its RAM quota: the page
    /// arena is `quota + quota × slack / 1024 + pageArenaSlackBytes` bytes.
    public static let pageArenaSlackPer1024 = 256
    /// Fixed fragmentation slack of a tenant's page arena (room for a few large pages).
    public static let pageArenaSlackBytes = 64 << 20
    /// VRAM pools (`VRAM_POOL`) one tenant may have registered at once.
    public static let maxVramPoolsPerTenant = 4
    /// Slots all of one tenant's `VRAM_LEASE` leases may name at once (a slot leased twice
    /// counts twice): bounds the directory's lease records whatever a client leaves unreleased.
    public static let maxVramLeasedSlotsPerTenant = 1 << 20
}
