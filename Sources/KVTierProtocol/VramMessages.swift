import KVTierCore

// The VRAM tier's directory (docs/protocol.md, "VRAM tier"; docs/vram-tier.md): pools of page
// slots in clients' GPU memory, which kvtierd only describes. Every bound a field has is checked
// by the decoder, so the daemon sees only pools it can hold: a value the spec does not allow
// (zero slots, an empty UUID or handle) is `malformed`, one over a limit is `tooLarge`.

/// `VRAM_POOL` request: `string deviceUUID` (1 to `maxDeviceUUIDBytes`), `u32 slots` (1 to
/// `maxVramSlots`), `u64 slotBytes` (1 to `maxVramSlotBytes`), `u16 handleLength` then that many
/// bytes `handle` (1 to `maxVramHandleBytes`, opaque to the daemon).
public struct VramPool: WireBody {
    public var deviceUUID: String
    public var slots: UInt32
    public var slotBytes: UInt64
    /// What another process of the tenant needs to map the pool (a CUDA IPC handle, wrapped).
    public var handle: [UInt8]

    public init(deviceUUID: String, slots: UInt32, slotBytes: UInt64, handle: [UInt8]) {
        self.deviceUUID = deviceUUID
        self.slots = slots
        self.slotBytes = slotBytes
        self.handle = handle
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        if let defect = Self.defect(uuidBytes: deviceUUID.utf8.count, slots: slots, slotBytes: slotBytes, handleBytes: handle.count) {
            throw defect
        }
        try writer.wireString(deviceUUID, field: "deviceUUID")
        writer.u32(slots)
        writer.u64(slotBytes)
        writer.u16(UInt16(handle.count))
        writer.raw(handle)
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "VRAM_POOL request")
        deviceUUID = try reader.string("deviceUUID")
        slots = try reader.u32()
        slotBytes = try reader.u64()
        let handleBytes = Int(try reader.u16())
        // Checked from the length alone, before the bytes are looked for.
        if let defect = Self.defect(uuidBytes: deviceUUID.utf8.count, slots: slots, slotBytes: slotBytes, handleBytes: handleBytes) {
            throw defect
        }
        handle = [UInt8](try reader.bytes(handleBytes))
        try reader.finish()
    }

    /// Why a pool with these fields cannot be registered, or nil.
    static func defect(uuidBytes: Int, slots: UInt32, slotBytes: UInt64, handleBytes: Int) -> ProtocolError? {
        if uuidBytes == 0 { return .malformed("VRAM_POOL request: deviceUUID is empty; send the GPU's UUID (1 to \(ProtocolLimits.maxDeviceUUIDBytes) bytes)") }
        if uuidBytes > ProtocolLimits.maxDeviceUUIDBytes {
            return .tooLarge(what: "VRAM_POOL deviceUUID (UTF-8 bytes)", size: UInt64(uuidBytes), limit: UInt64(ProtocolLimits.maxDeviceUUIDBytes))
        }
        if slots == 0 { return .malformed("VRAM_POOL request: slots is 0; a pool has 1 to \(ProtocolLimits.maxVramSlots) slots") }
        if Int(slots) > ProtocolLimits.maxVramSlots {
            return .tooLarge(what: "VRAM_POOL slots", size: UInt64(slots), limit: UInt64(ProtocolLimits.maxVramSlots))
        }
        if slotBytes == 0 { return .malformed("VRAM_POOL request: slotBytes is 0; a slot holds one page (1 to \(ProtocolLimits.maxVramSlotBytes) bytes)") }
        if slotBytes > ProtocolLimits.maxVramSlotBytes {
            return .tooLarge(what: "VRAM_POOL slotBytes", size: slotBytes, limit: ProtocolLimits.maxVramSlotBytes)
        }
        if handleBytes == 0 { return .malformed("VRAM_POOL request: handle is empty; send what other processes map the pool with") }
        if handleBytes > ProtocolLimits.maxVramHandleBytes {
            return .tooLarge(what: "VRAM_POOL handle (bytes)", size: UInt64(handleBytes), limit: UInt64(ProtocolLimits.maxVramHandleBytes))
        }
        return nil
    }
}

/// `VRAM_POOL` reply: `u32 poolID` (never 0).
public struct VramPoolReply: WireBody {
    public var poolID: UInt32

    public init(poolID: UInt32) { self.poolID = poolID }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) { writer.u32(poolID) }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "VRAM_POOL reply")
        poolID = try reader.u32()
        try reader.finish()
    }
}

/// `VRAM_PLACE` request: `u64 modelID`, `u32 poolID`, `tokens`.
public struct VramPlace: WireBody {
    public var modelID: UInt64
    public var poolID: UInt32
    public var tokens: [UInt32]

    public init(modelID: UInt64, poolID: UInt32, tokens: [UInt32]) {
        self.modelID = modelID
        self.poolID = poolID
        self.tokens = tokens
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        writer.u64(modelID)
        writer.u32(poolID)
        try writer.wireTokens(tokens, field: "tokens")
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "VRAM_PLACE request")
        modelID = try reader.u64()
        poolID = try reader.u32()
        tokens = try reader.tokens("tokens")
        try reader.finish()
    }
}

/// A slot `VRAM_PLACE` reserved: page `pageIndex` holds tokens
/// `pageIndex × pageTokens ..< pageIndex × pageTokens + tokens`; the client writes it into `slot`.
public struct VramPlacedPage: Sendable, Hashable {
    public var pageIndex: UInt32
    public var tokens: UInt32
    public var slot: UInt32

    public init(pageIndex: UInt32, tokens: UInt32, slot: UInt32) {
        self.pageIndex = pageIndex
        self.tokens = tokens
        self.slot = slot
    }

    static let encodedBytes = 12
}

/// `VRAM_PLACE` reply: `u64 leaseID` (0: nothing reserved), `u32 residentTokens`, `u32 count`,
/// then `count × (u32 pageIndex, u32 tokens, u32 slot)`; at most `maxVramSlots` entries.
public struct VramPlaceReply: WireBody {
    public var leaseID: UInt64
    /// Leading tokens of the prefix already resident in the pool before this call.
    public var residentTokens: UInt32
    public var pages: [VramPlacedPage]

    public init(leaseID: UInt64, residentTokens: UInt32, pages: [VramPlacedPage]) {
        self.leaseID = leaseID
        self.residentTokens = residentTokens
        self.pages = pages
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        guard pages.count <= ProtocolLimits.maxVramSlots else {
            throw .tooLarge(what: "VRAM_PLACE reply pages (entries)", size: UInt64(pages.count), limit: UInt64(ProtocolLimits.maxVramSlots))
        }
        writer.u64(leaseID)
        writer.u32(residentTokens)
        writer.u32(UInt32(pages.count))
        for page in pages {
            writer.u32(page.pageIndex)
            writer.u32(page.tokens)
            writer.u32(page.slot)
        }
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "VRAM_PLACE reply")
        leaseID = try reader.u64()
        residentTokens = try reader.u32()
        let count = try reader.count("pages", limit: ProtocolLimits.maxVramSlots, elementBytes: VramPlacedPage.encodedBytes)
        let fields = try reader.u32Array(count * 3)
        pages = (0..<count).map { VramPlacedPage(pageIndex: fields[3 * $0], tokens: fields[3 * $0 + 1], slot: fields[3 * $0 + 2]) }
        try reader.finish()
    }
}

/// `VRAM_COMMIT` request: `u64 leaseID` (a `VRAM_PLACE` lease of this connection). The reply is
/// empty.
public struct VramCommit: WireBody {
    public var leaseID: UInt64

    public init(leaseID: UInt64) { self.leaseID = leaseID }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) { writer.u64(leaseID) }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "VRAM_COMMIT request")
        leaseID = try reader.u64()
        try reader.finish()
    }
}

/// `VRAM_LEASE` request: `u64 modelID`, `tokens` (as `LOOKUP`).
public struct VramLease: WireBody {
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
        (modelID, tokens) = try ModelTokens.decode(body, context: "VRAM_LEASE request")
    }
}

/// A slot `VRAM_LEASE` lent: the next page of the prefix, `tokens` long, is in `slot`.
public struct VramLeasedPage: Sendable, Hashable {
    public var tokens: UInt32
    public var slot: UInt32

    public init(tokens: UInt32, slot: UInt32) {
        self.tokens = tokens
        self.slot = slot
    }

    static let encodedBytes = 8
}

/// `VRAM_LEASE` reply: `u32 poolID` (0: nothing resident; every other field empty or 0),
/// `string deviceUUID`, `u32 slots`, `u64 slotBytes`, `u16 handleLength` + `handle`,
/// `u64 leaseID`, `u32 tokens` (served), `u32 count`, `count × (u32 tokens, u32 slot)` in page
/// order from page 0; at most `maxVramSlots` entries.
public struct VramLeaseReply: WireBody {
    public var poolID: UInt32
    public var deviceUUID: String
    public var slots: UInt32
    public var slotBytes: UInt64
    public var handle: [UInt8]
    public var leaseID: UInt64
    public var tokens: UInt32
    public var pages: [VramLeasedPage]

    public init(poolID: UInt32, deviceUUID: String, slots: UInt32, slotBytes: UInt64, handle: [UInt8], leaseID: UInt64, tokens: UInt32,
                pages: [VramLeasedPage]) {
        self.poolID = poolID
        self.deviceUUID = deviceUUID
        self.slots = slots
        self.slotBytes = slotBytes
        self.handle = handle
        self.leaseID = leaseID
        self.tokens = tokens
        self.pages = pages
    }

    /// The reply when no pool of the tenant holds the prefix's first page.
    public static let none = VramLeaseReply(poolID: 0, deviceUUID: "", slots: 0, slotBytes: 0, handle: [], leaseID: 0, tokens: 0, pages: [])

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        guard handle.count <= ProtocolLimits.maxVramHandleBytes else {
            throw .tooLarge(what: "VRAM_LEASE reply handle (bytes)", size: UInt64(handle.count), limit: UInt64(ProtocolLimits.maxVramHandleBytes))
        }
        guard pages.count <= ProtocolLimits.maxVramSlots else {
            throw .tooLarge(what: "VRAM_LEASE reply pages (entries)", size: UInt64(pages.count), limit: UInt64(ProtocolLimits.maxVramSlots))
        }
        writer.u32(poolID)
        try writer.wireString(deviceUUID, field: "deviceUUID")
        writer.u32(slots)
        writer.u64(slotBytes)
        writer.u16(UInt16(handle.count))
        writer.raw(handle)
        writer.u64(leaseID)
        writer.u32(tokens)
        writer.u32(UInt32(pages.count))
        for page in pages {
            writer.u32(page.tokens)
            writer.u32(page.slot)
        }
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "VRAM_LEASE reply")
        poolID = try reader.u32()
        deviceUUID = try reader.string("deviceUUID")
        slots = try reader.u32()
        slotBytes = try reader.u64()
        let handleBytes = Int(try reader.u16())
        guard handleBytes <= ProtocolLimits.maxVramHandleBytes else {
            throw .tooLarge(what: "VRAM_LEASE reply handle (bytes)", size: UInt64(handleBytes), limit: UInt64(ProtocolLimits.maxVramHandleBytes))
        }
        handle = [UInt8](try reader.bytes(handleBytes))
        leaseID = try reader.u64()
        tokens = try reader.u32()
        let count = try reader.count("pages", limit: ProtocolLimits.maxVramSlots, elementBytes: VramLeasedPage.encodedBytes)
        let fields = try reader.u32Array(count * 2)
        pages = (0..<count).map { VramLeasedPage(tokens: fields[2 * $0], slot: fields[2 * $0 + 1]) }
        try reader.finish()
    }
}

/// `VRAM_DROP` request: `u32 poolID` (a pool this connection registered). The pool leaves the
/// directory for new requests at once (`LOOKUP`, `VRAM_PLACE`, `VRAM_LEASE` no longer see it;
/// its placements in progress end unwritten), and the reply says how many `VRAM_LEASE` leases
/// still read from it. The owner frees the pool's memory once a `VRAM_DROP` answers 0; the pool
/// is forgotten then.
public struct VramDrop: WireBody {
    public var poolID: UInt32

    public init(poolID: UInt32) { self.poolID = poolID }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) { writer.u32(poolID) }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "VRAM_DROP request")
        poolID = try reader.u32()
        try reader.finish()
    }
}

/// `VRAM_DROP` reply: `u32 readers`, the `VRAM_LEASE` leases still on the pool (0: its memory may
/// be freed).
public struct VramDropReply: WireBody {
    public var readers: UInt32

    public init(readers: UInt32) { self.readers = readers }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) { writer.u32(readers) }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "VRAM_DROP reply")
        readers = try reader.u32()
        try reader.finish()
    }
}
