import KVTierCore

/// The request of `SESSION_INFO`, `SESSION_DELETE` and `SESSION_TOKENS`: `string name`.
public struct SessionName: WireBody {
    public var name: String

    public init(_ name: String) { self.name = name }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        try writer.wireString(name, field: "name")
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "session request")
        name = try reader.string("name")
        try reader.finish()
    }
}

/// `SESSION_PIN` request: `string name`, `u8 pinned` (0 or 1). The reply is empty.
public struct SessionPin: WireBody {
    public var name: String
    public var pinned: Bool

    public init(name: String, pinned: Bool) {
        self.name = name
        self.pinned = pinned
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        try writer.wireString(name, field: "name")
        writer.bool(pinned)
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "SESSION_PIN request")
        name = try reader.string("name")
        pinned = try reader.bool("pinned")
        try reader.finish()
    }
}

/// `SESSION_TTL` request: `string name`, `u32 seconds` (0: none). The reply is empty.
public struct SessionTTL: WireBody {
    public var name: String
    public var seconds: UInt32

    public init(name: String, seconds: UInt32) {
        self.name = name
        self.seconds = seconds
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        try writer.wireString(name, field: "name")
        writer.u32(seconds)
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "SESSION_TTL request")
        name = try reader.string("name")
        seconds = try reader.u32()
        try reader.finish()
    }
}

/// `SESSION_FORK` request: `string from`, `string to`. The reply is the fork's `SessionInfo`.
public struct SessionFork: WireBody {
    public var from: String
    public var to: String

    public init(from: String, to: String) {
        self.from = from
        self.to = to
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        try writer.wireString(from, field: "from")
        try writer.wireString(to, field: "to")
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "SESSION_FORK request")
        from = try reader.string("from")
        to = try reader.string("to")
        try reader.finish()
    }
}

/// `sessionInfo`: `string name`, `u64 modelID`, `u32 tokens`, `u8 pinned`, `u32 ttlSeconds`,
/// `u64 lastUsedMicros`, `u32 ramTokens`, `u32 diskTokens`: a `SESSION_LIST` entry followed by
/// where its pages are. The reply of `SESSION_INFO` and `SESSION_FORK`.
public struct SessionInfo: WireBody {
    public var name: String
    public var modelID: UInt64
    public var tokens: UInt32
    public var pinned: Bool
    public var ttlSeconds: UInt32
    public var lastUsedMicros: UInt64
    public var ramTokens: UInt32
    public var diskTokens: UInt32

    /// The fewest bytes one entry takes (an empty name).
    public static let minimumBytes = SessionEntry.minimumBytes + 4 + 4

    public init(name: String, modelID: UInt64, tokens: UInt32, pinned: Bool, ttlSeconds: UInt32,
                lastUsedMicros: UInt64, ramTokens: UInt32, diskTokens: UInt32) {
        self.name = name
        self.modelID = modelID
        self.tokens = tokens
        self.pinned = pinned
        self.ttlSeconds = ttlSeconds
        self.lastUsedMicros = lastUsedMicros
        self.ramTokens = ramTokens
        self.diskTokens = diskTokens
    }

    /// The fields a `SESSION_LIST` entry has too.
    public var entry: SessionEntry {
        SessionEntry(name: name, modelID: modelID, tokens: tokens, pinned: pinned, ttlSeconds: ttlSeconds, lastUsedMicros: lastUsedMicros)
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        try entry.encode(into: &writer)
        writer.u32(ramTokens)
        writer.u32(diskTokens)
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "sessionInfo")
        try self.init(from: &reader)
        try reader.finish()
    }

    init(from reader: inout BodyReader) throws(ProtocolError) {
        let entry = try SessionEntry(from: &reader)
        self.init(name: entry.name, modelID: entry.modelID, tokens: entry.tokens, pinned: entry.pinned, ttlSeconds: entry.ttlSeconds,
                  lastUsedMicros: entry.lastUsedMicros, ramTokens: try reader.u32(), diskTokens: try reader.u32())
    }
}

/// `SESSION_TOKENS` reply: `u64 modelID`, `tokens`.
public struct SessionTokensReply: WireBody {
    public var modelID: UInt64
    public var tokens: [UInt32]

    public init(modelID: UInt64, tokens: [UInt32]) {
        self.modelID = modelID
        self.tokens = tokens
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        try ModelTokens.encode(modelID, tokens, into: &writer)
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        (modelID, tokens) = try ModelTokens.decode(body, context: "SESSION_TOKENS reply")
    }
}
