import KVTierCore

/// Capability bits of `HELLO`. Unknown bits are kept, not rejected: capabilities are offers, and
/// a peer ignores the ones it does not know.
public struct Capabilities: OptionSet, Sendable, Hashable {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// Request: the client can map shared memory. Reply: the daemon offers the arena.
    public static let sharedMemory = Capabilities(rawValue: 1 << 0)
}

/// `HELLO` request: `u16 minVersion`, `u16 maxVersion`, `u32 capabilities`, `string clientName`.
public struct Hello: WireBody {
    public var minVersion: UInt16
    public var maxVersion: UInt16
    public var capabilities: Capabilities
    public var clientName: String

    public init(minVersion: UInt16 = ProtocolVersion.oldestSupported, maxVersion: UInt16 = ProtocolVersion.current,
                capabilities: Capabilities, clientName: String) {
        self.minVersion = minVersion
        self.maxVersion = maxVersion
        self.capabilities = capabilities
        self.clientName = clientName
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        writer.u16(minVersion)
        writer.u16(maxVersion)
        writer.u32(capabilities.rawValue)
        try writer.wireString(clientName, field: "clientName")
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "HELLO request")
        minVersion = try reader.u16()
        maxVersion = try reader.u16()
        capabilities = Capabilities(rawValue: try reader.u32())
        clientName = try reader.string("clientName")
        try reader.finish()
    }
}

/// `HELLO` reply: `u16 version`, `u32 tenant`, `u32 capabilities`, `u32 maxControlBody`,
/// `u32 maxInlineBody`, `u32 maxTokensPerRequest`, `u64 arenaBytes`, `u64 stagingBytes`. With
/// `.sharedMemory` the frame carries two memfds (`FrameFlags.fileDescriptors`): the page arena
/// (`arenaBytes`, clients map it read-only) then the staging arena (`stagingBytes`, read-write).
public struct HelloReply: WireBody {
    public var version: UInt16
    public var tenant: TenantID
    public var capabilities: Capabilities
    public var maxControlBody: UInt32
    public var maxInlineBody: UInt32
    public var maxTokensPerRequest: UInt32
    /// Length of the page arena (GET extents); 0 without shared memory.
    public var arenaBytes: UInt64
    /// Length of the staging arena (ALLOC extents); 0 without shared memory.
    public var stagingBytes: UInt64

    public init(version: UInt16 = ProtocolVersion.current, tenant: TenantID, capabilities: Capabilities,
                maxControlBody: UInt32 = UInt32(ProtocolLimits.maxControlBody),
                maxInlineBody: UInt32 = UInt32(ProtocolLimits.maxInlineBody),
                maxTokensPerRequest: UInt32 = UInt32(ProtocolLimits.maxTokensPerRequest), arenaBytes: UInt64,
                stagingBytes: UInt64 = 0) {
        self.version = version
        self.tenant = tenant
        self.capabilities = capabilities
        self.maxControlBody = maxControlBody
        self.maxInlineBody = maxInlineBody
        self.maxTokensPerRequest = maxTokensPerRequest
        self.arenaBytes = arenaBytes
        self.stagingBytes = stagingBytes
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        writer.u16(version)
        writer.u32(tenant.rawValue)
        writer.u32(capabilities.rawValue)
        writer.u32(maxControlBody)
        writer.u32(maxInlineBody)
        writer.u32(maxTokensPerRequest)
        writer.u64(arenaBytes)
        writer.u64(stagingBytes)
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "HELLO reply")
        version = try reader.u16()
        tenant = TenantID(try reader.u32())
        capabilities = Capabilities(rawValue: try reader.u32())
        maxControlBody = try reader.u32()
        maxInlineBody = try reader.u32()
        maxTokensPerRequest = try reader.u32()
        arenaBytes = try reader.u64()
        stagingBytes = try reader.u64()
        try reader.finish()
    }
}
