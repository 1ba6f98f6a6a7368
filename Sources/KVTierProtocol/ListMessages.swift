import KVTierCore

/// The request of `SESSION_LIST` and `MODELS`: `u32 offset`, `u32 limit` (1 to
/// `ProtocolLimits.maxListEntries`). Lists page, so one reply never outgrows a control frame nor
/// costs the daemon more than `limit` entries of work, however many a tenant holds.
public struct ListPage: Sendable, Equatable {
    public var offset: UInt32
    public var limit: UInt32

    public init(offset: UInt32 = 0, limit: UInt32 = UInt32(ProtocolLimits.maxListEntries)) {
        self.offset = offset
        self.limit = limit
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        try Self.check(limit)
        writer.u32(offset)
        writer.u32(limit)
    }

    public init(decoding body: UnsafeRawBufferPointer, context: String) throws(ProtocolError) {
        var reader = BodyReader(body, context: context)
        offset = try reader.u32()
        limit = try reader.u32()
        try reader.finish()
        try Self.check(limit)
    }

    public init(decoding body: [UInt8], context: String) throws(ProtocolError) {
        self = try withRawBytes(body) { (raw) throws(ProtocolError) -> ListPage in try ListPage(decoding: raw, context: context) }
    }

    static func check(_ limit: UInt32) throws(ProtocolError) {
        guard limit >= 1, limit <= ProtocolLimits.maxListEntries else {
            throw .tooLarge(what: "list page limit (entries; 1 to maxListEntries)", size: UInt64(limit), limit: UInt64(ProtocolLimits.maxListEntries))
        }
    }

    /// The positions `offset ..< offset + limit` cut to a list of `count` entries.
    public func range(in count: Int) -> Range<Int> {
        let start = min(count, Int(offset))
        return start..<min(count, start + Int(limit))
    }
}

/// One session of a `SESSION_LIST` reply: `string name`, `u64 modelID`, `u32 tokens`,
/// `u8 pinned`, `u32 ttlSeconds`, `u64 lastUsedMicros`. Where its pages are (RAM, disk) is
/// `SESSION_INFO`'s: counting that walks every page of the session.
public struct SessionEntry: Sendable, Equatable {
    public var name: String
    public var modelID: UInt64
    public var tokens: UInt32
    public var pinned: Bool
    public var ttlSeconds: UInt32
    public var lastUsedMicros: UInt64

    public init(name: String, modelID: UInt64, tokens: UInt32, pinned: Bool, ttlSeconds: UInt32, lastUsedMicros: UInt64) {
        self.name = name
        self.modelID = modelID
        self.tokens = tokens
        self.pinned = pinned
        self.ttlSeconds = ttlSeconds
        self.lastUsedMicros = lastUsedMicros
    }

    /// The fewest bytes one entry takes (an empty name).
    static let minimumBytes = 2 + 8 + 4 + 1 + 4 + 8

    func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        try writer.wireString(name, field: "name")
        writer.u64(modelID)
        writer.u32(tokens)
        writer.bool(pinned)
        writer.u32(ttlSeconds)
        writer.u64(lastUsedMicros)
    }

    init(from reader: inout BodyReader) throws(ProtocolError) {
        name = try reader.string("name")
        modelID = try reader.u64()
        tokens = try reader.u32()
        pinned = try reader.bool("pinned")
        ttlSeconds = try reader.u32()
        lastUsedMicros = try reader.u64()
    }
}

/// `SESSION_LIST` reply: `u32 total` (the tenant's sessions now), `u32 count`, `count ×
/// sessionEntry` from position `offset`, most recently used first.
public struct SessionListReply: WireBody {
    public var total: UInt32
    public var sessions: [SessionEntry]

    public init(total: UInt32, sessions: [SessionEntry]) {
        self.total = total
        self.sessions = sessions
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        guard sessions.count <= ProtocolLimits.maxListEntries else {
            throw .tooLarge(what: "SESSION_LIST reply entries", size: UInt64(sessions.count), limit: UInt64(ProtocolLimits.maxListEntries))
        }
        writer.u32(total)
        writer.u32(UInt32(sessions.count))
        for session in sessions { try session.encode(into: &writer) }
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "SESSION_LIST reply")
        total = try reader.u32()
        let count = try reader.count("sessions", limit: ProtocolLimits.maxListEntries, elementBytes: SessionEntry.minimumBytes)
        var sessions: [SessionEntry] = []
        sessions.reserveCapacity(count)
        for _ in 0..<count { sessions.append(try SessionEntry(from: &reader)) }
        self.sessions = sessions
        try reader.finish()
    }
}

/// `MODELS` reply: `u32 total` (models the asking tenant registered), `u32 count`, `count ×
/// (u64 modelID, registration)` from position `offset`, by model id (`ModelEntry`).
public struct ModelsReply: WireBody {
    public var total: UInt32
    public var models: [ModelEntry]

    public init(total: UInt32, models: [ModelEntry]) {
        self.total = total
        self.models = models
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        guard models.count <= ProtocolLimits.maxListEntries else {
            throw .tooLarge(what: "MODELS reply entries", size: UInt64(models.count), limit: UInt64(ProtocolLimits.maxListEntries))
        }
        writer.u32(total)
        writer.u32(UInt32(models.count))
        for model in models {
            writer.u64(model.modelID)
            try model.registration.encodeListed(into: &writer)
        }
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "MODELS reply")
        total = try reader.u32()
        let count = try reader.count("models", limit: ProtocolLimits.maxListEntries, elementBytes: ModelEntry.minimumBytes)
        var models: [ModelEntry] = []
        models.reserveCapacity(count)
        for _ in 0..<count {
            let modelID = try reader.u64()
            models.append(ModelEntry(modelID: modelID, registration: try RegisterModel(listedFrom: &reader)))
        }
        self.models = models
        try reader.finish()
    }
}
