/// The operations of docs/protocol.md, "Opcodes". A reply carries its request's opcode.
public enum Opcode: UInt16, Sendable, CaseIterable, CustomStringConvertible {
    case hello = 0x0001
    case ping = 0x0002
    case registerModel = 0x0010
    case lookup = 0x0020
    case put = 0x0021
    case get = 0x0022
    case release = 0x0023
    case alloc = 0x0024
    case sessionList = 0x0030
    case sessionInfo = 0x0031
    case sessionPin = 0x0032
    case sessionTTL = 0x0033
    case sessionFork = 0x0034
    case sessionDelete = 0x0035
    case sessionTokens = 0x0036
    case attention = 0x0040
    case querySample = 0x0041
    case status = 0x0050
    case pages = 0x0051
    case evict = 0x0052
    case models = 0x0053
    case codecs = 0x0054
    case vramPool = 0x0060
    case vramPlace = 0x0061
    case vramCommit = 0x0062
    case vramLease = 0x0063
    case vramDrop = 0x0064

    /// The spec's name, as in `LOOKUP`.
    public var description: String {
        switch self {
        case .hello: "HELLO"
        case .ping: "PING"
        case .registerModel: "REGISTER_MODEL"
        case .lookup: "LOOKUP"
        case .put: "PUT"
        case .get: "GET"
        case .release: "RELEASE"
        case .alloc: "ALLOC"
        case .sessionList: "SESSION_LIST"
        case .sessionInfo: "SESSION_INFO"
        case .sessionPin: "SESSION_PIN"
        case .sessionTTL: "SESSION_TTL"
        case .sessionFork: "SESSION_FORK"
        case .sessionDelete: "SESSION_DELETE"
        case .sessionTokens: "SESSION_TOKENS"
        case .attention: "ATTENTION"
        case .querySample: "QUERY_SAMPLE"
        case .status: "STATUS"
        case .pages: "PAGES"
        case .evict: "EVICT"
        case .models: "MODELS"
        case .codecs: "CODECS"
        case .vramPool: "VRAM_POOL"
        case .vramPlace: "VRAM_PLACE"
        case .vramCommit: "VRAM_COMMIT"
        case .vramLease: "VRAM_LEASE"
        case .vramDrop: "VRAM_DROP"
        }
    }
}

/// The `flags` field of a frame header. Bits beyond these are rejected, so a later version can
/// give them a meaning without old peers misreading it.
public struct FrameFlags: OptionSet, Sendable, Hashable {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    /// The frame is a reply (bit 0).
    public static let reply = FrameFlags(rawValue: 1 << 0)
    /// File descriptors ride on the frame's first byte as SCM_RIGHTS (bit 1).
    public static let fileDescriptors = FrameFlags(rawValue: 1 << 1)
    /// Every bit the protocol defines.
    public static let known: FrameFlags = [.reply, .fileDescriptors]

    /// The flags of a received header; throws for undefined bits.
    public init(validating rawValue: UInt16) throws(ProtocolError) {
        guard rawValue & ~Self.known.rawValue == 0 else { throw .unsupportedFlags(rawValue) }
        self.rawValue = rawValue
    }
}
