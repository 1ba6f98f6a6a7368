import KVTierCore

/// `PAGES` request: `u64 modelID` (0: every model), `u32 offset`, `u32 limit` (1 to
/// `maxPagesPerReply`). Lists the tenant's pages for inspection (`kvtier pages`).
public struct Pages: WireBody {
    public var modelID: UInt64
    public var offset: UInt32
    public var limit: UInt32

    /// Most entries one reply holds (`PageInfo.encodedBytes` each, well under `maxControlBody`).
    public static let maxPagesPerReply = 16_384

    public init(modelID: UInt64, offset: UInt32, limit: UInt32) {
        self.modelID = modelID
        self.offset = offset
        self.limit = limit
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        guard limit >= 1, limit <= Self.maxPagesPerReply else {
            throw .tooLarge(what: "PAGES limit", size: UInt64(limit), limit: UInt64(Self.maxPagesPerReply))
        }
        writer.u64(modelID)
        writer.u32(offset)
        writer.u32(limit)
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "PAGES request")
        modelID = try reader.u64()
        offset = try reader.u32()
        limit = try reader.u32()
        try reader.finish()
        guard limit >= 1, limit <= Self.maxPagesPerReply else {
            throw .malformed("PAGES limit \(limit) is outside 1...\(Self.maxPagesPerReply)")
        }
    }
}

/// One page of a `PAGES` reply, `encodedBytes` long: `u64 keyHigh`, `u64 keyLow`, `u64 modelID`,
/// `u32 tokens`, `u8 tiers` (bit 0 RAM, bit 1 disk), `u8 hold` (0 none, 1 a session's, 2 a
/// pinned session's), `u16 leases`, `f32 heat`, `u32 codecTag` (on disk; 0 when not),
/// `u32 storedBytes` (its disk record; 0 when not on disk), `u32 rawBytes`, `u64 idleMicros`
/// (since its last access).
public struct PageInfo: Sendable, Equatable {
    public struct Tiers: OptionSet, Sendable, Hashable {
        public var rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        public static let ram = Tiers(rawValue: 1 << 0)
        public static let disk = Tiers(rawValue: 1 << 1)
    }

    public var key: PageKey
    public var modelID: UInt64
    public var tokens: UInt32
    public var tiers: Tiers
    public var hold: UInt8
    public var leases: UInt16
    public var heat: Float
    public var codecTag: UInt32
    public var storedBytes: UInt32
    public var rawBytes: UInt32
    public var idleMicros: UInt64

    public init(key: PageKey, modelID: UInt64, tokens: UInt32, tiers: Tiers, hold: UInt8, leases: UInt16, heat: Float,
                codecTag: UInt32, storedBytes: UInt32, rawBytes: UInt32, idleMicros: UInt64) {
        self.key = key
        self.modelID = modelID
        self.tokens = tokens
        self.tiers = tiers
        self.hold = hold
        self.leases = leases
        self.heat = heat
        self.codecTag = codecTag
        self.storedBytes = storedBytes
        self.rawBytes = rawBytes
        self.idleMicros = idleMicros
    }

    static let encodedBytes = 16 + 8 + 4 + 1 + 1 + 2 + 4 + 4 + 4 + 4 + 8

    func encode(into writer: inout ByteWriter) {
        writer.key(key)
        writer.u64(modelID)
        writer.u32(tokens)
        writer.u8(tiers.rawValue)
        writer.u8(hold)
        writer.u16(leases)
        writer.f32(heat)
        writer.u32(codecTag)
        writer.u32(storedBytes)
        writer.u32(rawBytes)
        writer.u64(idleMicros)
    }

    init(from reader: inout BodyReader) throws(ProtocolError) {
        let high = try reader.u64()
        key = PageKey(high: high, low: try reader.u64())
        modelID = try reader.u64()
        tokens = try reader.u32()
        let tierBits = try reader.u8()
        guard tierBits & ~3 == 0 else { throw .malformed("page tiers \(tierBits) has undefined bits") }
        tiers = Tiers(rawValue: tierBits)
        hold = try reader.u8()
        guard hold <= 2 else { throw .malformed("page hold \(hold) is not 0, 1 or 2") }
        leases = try reader.u16()
        heat = try reader.f32()
        codecTag = try reader.u32()
        storedBytes = try reader.u32()
        rawBytes = try reader.u32()
        idleMicros = try reader.u64()
    }

    /// Bit-exact equality (heat may be NaN in a fuzzed round trip).
    public static func == (a: PageInfo, b: PageInfo) -> Bool {
        a.key == b.key && a.modelID == b.modelID && a.tokens == b.tokens && a.tiers == b.tiers && a.hold == b.hold
            && a.leases == b.leases && a.heat.bitPattern == b.heat.bitPattern && a.codecTag == b.codecTag
            && a.storedBytes == b.storedBytes && a.rawBytes == b.rawBytes && a.idleMicros == b.idleMicros
    }
}

/// `PAGES` reply: `u32 total` (pages of the tenant and model now), `u32 count`, `count × pageInfo`.
public struct PagesReply: WireBody {
    public var total: UInt32
    public var pages: [PageInfo]

    public init(total: UInt32, pages: [PageInfo]) {
        self.total = total
        self.pages = pages
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        guard pages.count <= Pages.maxPagesPerReply else {
            throw .tooLarge(what: "PAGES reply entries", size: UInt64(pages.count), limit: UInt64(Pages.maxPagesPerReply))
        }
        writer.u32(total)
        writer.u32(UInt32(pages.count))
        for page in pages { page.encode(into: &writer) }
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "PAGES reply")
        total = try reader.u32()
        let count = try reader.count("pages", limit: Pages.maxPagesPerReply, elementBytes: PageInfo.encodedBytes)
        var pages: [PageInfo] = []
        pages.reserveCapacity(count)
        for _ in 0..<count { pages.append(try PageInfo(from: &reader)) }
        self.pages = pages
        try reader.finish()
    }
}

/// `EVICT` request: `u64 modelID`, `tokens`, `u8 flags` (bit 0: delete from disk too; bit 1:
/// every page of the tenant and model — modelID 0 for every model — instead of `tokens`'
/// cached prefix), `string session` (non-empty: that session's pages, without counting as a use
/// of it; then `modelID` is 0, `tokens` empty and bit 1 clear).
public struct Evict: WireBody {
    public var modelID: UInt64
    public var tokens: [UInt32]
    public var deleteFromDisk: Bool
    public var everyPage: Bool
    public var session: String

    public init(modelID: UInt64, tokens: [UInt32], deleteFromDisk: Bool, everyPage: Bool, session: String = "") {
        self.modelID = modelID
        self.tokens = tokens
        self.deleteFromDisk = deleteFromDisk
        self.everyPage = everyPage
        self.session = session
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        writer.u64(modelID)
        try writer.wireTokens(tokens, field: "tokens")
        writer.u8((deleteFromDisk ? 1 : 0) | (everyPage ? 2 : 0))
        try writer.wireString(session, field: "session")
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "EVICT request")
        modelID = try reader.u64()
        tokens = try reader.tokens("tokens")
        let flags = try reader.flags("flags", known: 3)
        deleteFromDisk = flags & 1 != 0
        everyPage = flags & 2 != 0
        session = try reader.string("session")
        try reader.finish()
    }
}

/// `EVICT` reply: `u32 evicted` (moved out of RAM), `u32 deleted` (removed from disk),
/// `u32 skipped` (leased, or held by a pinned session).
public struct EvictReply: WireBody {
    public var evicted: UInt32
    public var deleted: UInt32
    public var skipped: UInt32

    public init(evicted: UInt32, deleted: UInt32, skipped: UInt32) {
        self.evicted = evicted
        self.deleted = deleted
        self.skipped = skipped
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        writer.u32(evicted)
        writer.u32(deleted)
        writer.u32(skipped)
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "EVICT reply")
        evicted = try reader.u32()
        deleted = try reader.u32()
        skipped = try reader.u32()
        try reader.finish()
    }
}
