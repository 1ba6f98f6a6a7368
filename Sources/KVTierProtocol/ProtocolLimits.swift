/// Every limit of the wire protocol (docs/protocol.md, "Limits") in one place. A frame or body
/// beyond one is rejected with `ProtocolError.tooLarge` naming the limit, before anything of the
/// announced size is allocated.
public enum ProtocolLimits {
    /// 2 MiB: the largest body of every frame except inline-data frames; large enough that a
    /// list of `maxTokensPerRequest` tokens always fits, so that limit is the binding one.
    public static let maxControlBody = 2 << 20
    /// 64 MiB: the largest body of a `PUT` request or a `GET` reply (the frames that may carry
    /// inline page bytes).
    public static let maxInlineBody = 64 << 20
    /// 262 144: the most token ids in one token list (and the most per-page entries of an
    /// `ATTENTION` request, since a page holds at least one token).
    public static let maxTokensPerRequest = 262_144
    /// 1024: the most UTF-8 bytes in one string.
    public static let maxStringBytes = 1024
    /// 4096: the most extents in one extent list, and the most sizes in one `ALLOC` request.
    public static let maxExtents = 4096
    /// 1024: the most entries of one `SESSION_LIST` or `MODELS` reply (a request asks for a
    /// page of at most this many). With names of at most `maxStringBytes` a full page stays
    /// under `maxControlBody` whatever the tenant holds, so the daemon never builds a reply it
    /// cannot send, and the work of one reply is bounded by this, not by the tenant's state.
    public static let maxListEntries = 1024
    /// 10 s: the longest a frame may take from its first byte to its last. The decoder is pure
    /// and keeps no clock; the server times `FrameDecoder.isMidFrame`.
    public static let frameTimeout: Duration = .seconds(10)
    /// 4096: extents' offsets and lengths are multiples of this (the arena's page size).
    public static let extentAlignment: UInt64 = 4096
    /// 16: the bytes of every frame header.
    public static let frameHeaderBytes = 16
    /// 65 536: the most slots of one VRAM pool (`VRAM_POOL`), hence the most pages one
    /// `VRAM_PLACE` or `VRAM_LEASE` reply lists.
    public static let maxVramSlots = 65_536
    /// 1 GiB: the largest slot of a VRAM pool (a page of one model, all layers).
    public static let maxVramSlotBytes: UInt64 = 1 << 30
    /// 1024: the most bytes of a VRAM pool's handle (opaque to the daemon).
    public static let maxVramHandleBytes = 1024
    /// 64: the most UTF-8 bytes of a VRAM pool's device UUID.
    public static let maxDeviceUUIDBytes = 64
}

/// The protocol versions this build speaks.
public enum ProtocolVersion {
    /// The version of docs/protocol.md this module implements. 2: `LOOKUP` replies end in
    /// `vramTokens`, and the `VRAM_*` opcodes exist.
    public static let current: UInt16 = 2
    /// The oldest version this build still speaks (a version 1 client would misread `LOOKUP`).
    public static let oldestSupported: UInt16 = 2

    /// The highest version both sides speak, given the client's `HELLO` range; nil when there is
    /// none (reply `unsupportedVersion`).
    public static func negotiate(minVersion: UInt16, maxVersion: UInt16) -> UInt16? {
        let high = min(maxVersion, current)
        let low = max(minVersion, oldestSupported)
        return low <= high ? high : nil
    }
}
