import KVTierCore

/// `LOOKUP` request: `u64 modelID`, `tokens`.
public struct Lookup: WireBody {
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
        (modelID, tokens) = try ModelTokens.decode(body, context: "LOOKUP request")
    }
}

/// The `u64 modelID`, `tokens` body that `LOOKUP` and the `SESSION_TOKENS` reply share.
enum ModelTokens {
    static func encode(_ modelID: UInt64, _ tokens: [UInt32], into writer: inout ByteWriter) throws(ProtocolError) {
        writer.u64(modelID)
        try writer.wireTokens(tokens, field: "tokens")
    }

    static func decode(_ body: UnsafeRawBufferPointer, context: String) throws(ProtocolError) -> (UInt64, [UInt32]) {
        var reader = BodyReader(body, context: context)
        let modelID = try reader.u64()
        let tokens = try reader.tokens("tokens")
        try reader.finish()
        return (modelID, tokens)
    }
}

/// `LOOKUP` reply: `u32 cachedTokens`, `u32 ramTokens`, `u32 diskTokens`, `u64 estimatedLoadMicros`,
/// `u32 vramTokens` (protocol version 2).
public struct LookupReply: WireBody {
    /// The longest cached prefix, at token granularity.
    public var cachedTokens: UInt32
    public var ramTokens: UInt32
    public var diskTokens: UInt32
    public var estimatedLoadMicros: UInt64
    /// Leading tokens of the cached prefix whose pages are all resident in one VRAM pool of the
    /// tenant (the pool holding the first page); at most `cachedTokens`, independent of the
    /// RAM/disk split.
    public var vramTokens: UInt32

    public init(cachedTokens: UInt32, ramTokens: UInt32, diskTokens: UInt32, estimatedLoadMicros: UInt64, vramTokens: UInt32 = 0) {
        self.cachedTokens = cachedTokens
        self.ramTokens = ramTokens
        self.diskTokens = diskTokens
        self.estimatedLoadMicros = estimatedLoadMicros
        self.vramTokens = vramTokens
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        writer.u32(cachedTokens)
        writer.u32(ramTokens)
        writer.u32(diskTokens)
        writer.u64(estimatedLoadMicros)
        writer.u32(vramTokens)
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "LOOKUP reply")
        cachedTokens = try reader.u32()
        ramTokens = try reader.u32()
        diskTokens = try reader.u32()
        estimatedLoadMicros = try reader.u64()
        vramTokens = try reader.u32()
        try reader.finish()
    }
}

/// `PUT` request: `u64 modelID`, `string session`, `u8 flags` (bit 0 durable, bit 1 inline),
/// `tokens`, `u32 dataStart`, then `extents` or `bytes`. Whether `dataStart` and the data fit
/// the cached prefix and the model's shape is the daemon's `invalidArgument`.
public struct Put: WireBody {
    public var modelID: UInt64
    /// Empty: no session.
    public var session: String
    /// Reply only once the pages are on disk.
    public var durable: Bool
    public var tokens: [UInt32]
    public var dataStart: UInt32
    public var data: PageData

    static let durableFlag: UInt8 = 1 << 0
    static let inlineFlag: UInt8 = 1 << 1

    public init(modelID: UInt64, session: String = "", durable: Bool = false, tokens: [UInt32], dataStart: UInt32, data: PageData) {
        self.modelID = modelID
        self.session = session
        self.durable = durable
        self.tokens = tokens
        self.dataStart = dataStart
        self.data = data
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        writer.u64(modelID)
        try writer.wireString(session, field: "session")
        writer.u8((durable ? Self.durableFlag : 0) | (data.isInline ? Self.inlineFlag : 0))
        try writer.wireTokens(tokens, field: "tokens")
        writer.u32(dataStart)
        try data.encode(into: &writer, field: "data")
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "PUT request")
        modelID = try reader.u64()
        session = try reader.string("session")
        let flags = try reader.flags("flags", known: Self.durableFlag | Self.inlineFlag)
        durable = flags & Self.durableFlag != 0
        tokens = try reader.tokens("tokens")
        dataStart = try reader.u32()
        data = try PageData.decode(from: &reader, inline: flags & Self.inlineFlag != 0, field: "data")
        try reader.finish()
    }
}

/// `PUT` reply: `u32 cachedTokens` (after the put), `u32 newPages`.
public struct PutReply: WireBody {
    public var cachedTokens: UInt32
    public var newPages: UInt32

    public init(cachedTokens: UInt32, newPages: UInt32) {
        self.cachedTokens = cachedTokens
        self.newPages = newPages
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        writer.u32(cachedTokens)
        writer.u32(newPages)
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "PUT reply")
        cachedTokens = try reader.u32()
        newPages = try reader.u32()
        try reader.finish()
    }
}

/// `GET` request: `u64 modelID`, `tokens`, `u32 maxTokens` (0: all cached), `u8 flags` (bit 1
/// inline, bit 2 pages; bit 0 is undefined and rejected), then with bit 2 `u32 count` and
/// `count × u32` page indices, strictly increasing: those whole pages of `tokens` instead of the
/// cached prefix (an offloading client fetching the cold pages a step needs). `maxTokens` must
/// then be 0. Whether each index is a whole page of `tokens` is the daemon's `invalidArgument`.
public struct Get: WireBody {
    public var modelID: UInt64
    public var tokens: [UInt32]
    public var maxTokens: UInt32
    /// Ask for the pages inline in the reply instead of as arena extents.
    public var inline: Bool
    /// nil: the cached prefix. Otherwise the indices of the whole pages of `tokens` wanted, in
    /// increasing order.
    public var pages: [UInt32]?

    static let inlineFlag: UInt8 = 1 << 1
    static let pagesFlag: UInt8 = 1 << 2

    public init(modelID: UInt64, tokens: [UInt32], maxTokens: UInt32 = 0, inline: Bool = false, pages: [UInt32]? = nil) {
        self.modelID = modelID
        self.tokens = tokens
        self.maxTokens = maxTokens
        self.inline = inline
        self.pages = pages
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        writer.u64(modelID)
        try writer.wireTokens(tokens, field: "tokens")
        writer.u32(maxTokens)
        writer.u8((inline ? Self.inlineFlag : 0) | (pages != nil ? Self.pagesFlag : 0))
        if let pages {
            if let defect = Self.pagesDefect(pages, maxTokens: maxTokens) { throw .malformed("GET request: \(defect)") }
            try writer.wireTokens(pages, field: "pages")
        }
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "GET request")
        modelID = try reader.u64()
        tokens = try reader.tokens("tokens")
        maxTokens = try reader.u32()
        let flags = try reader.flags("flags", known: Self.inlineFlag | Self.pagesFlag)
        inline = flags & Self.inlineFlag != 0
        if flags & Self.pagesFlag != 0 {
            let count = try reader.count("page list", limit: ProtocolLimits.maxExtents, elementBytes: 4)
            let pages = try reader.u32Array(count)
            if let defect = Self.pagesDefect(pages, maxTokens: maxTokens) { throw .malformed("GET request: \(defect)") }
            self.pages = pages
        } else {
            pages = nil
        }
        try reader.finish()
    }

    /// Why a page list cannot be sent: more than one reply's extents, out of order, or with a
    /// `maxTokens` it would contradict.
    static func pagesDefect(_ pages: [UInt32], maxTokens: UInt32) -> String? {
        if pages.count > ProtocolLimits.maxExtents { return "\(pages.count) pages asked for; one GET serves at most \(ProtocolLimits.maxExtents)" }
        if maxTokens != 0 { return "maxTokens is \(maxTokens) with a page list; send 0 (the pages say what is wanted)" }
        for i in pages.indices.dropFirst() where pages[i] <= pages[i - 1] {
            return "page indices must increase strictly; \(pages[i]) follows \(pages[i - 1])"
        }
        return nil
    }
}

/// `GET` reply: `u32 tokens` (served), `u64 leaseID`, then `extents` (one per page) or `bytes`.
/// The body does not say which: the reader passes the `inline` flag of its request.
public struct GetReply: Sendable, Equatable {
    public var tokens: UInt32
    public var leaseID: UInt64
    public var data: PageData

    public init(tokens: UInt32, leaseID: UInt64, data: PageData) {
        self.tokens = tokens
        self.leaseID = leaseID
        self.data = data
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        writer.u32(tokens)
        writer.u64(leaseID)
        try data.encode(into: &writer, field: "pages")
    }

    /// `inline`: the `inline` flag of the `GET` this answers.
    public init(decoding body: UnsafeRawBufferPointer, inline: Bool) throws(ProtocolError) {
        var reader = BodyReader(body, context: "GET reply")
        tokens = try reader.u32()
        leaseID = try reader.u64()
        data = try PageData.decode(from: &reader, inline: inline, field: "pages")
        try reader.finish()
    }

    public init(decoding body: [UInt8], inline: Bool) throws(ProtocolError) {
        self = try withRawBytes(body) { (raw) throws(ProtocolError) -> GetReply in try GetReply(decoding: raw, inline: inline) }
    }
}
