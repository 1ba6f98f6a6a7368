import KVTierCore

/// `RELEASE` request: `u64 leaseID`. The reply is empty.
public struct Release: WireBody {
    public var leaseID: UInt64

    public init(leaseID: UInt64) { self.leaseID = leaseID }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) { writer.u64(leaseID) }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "RELEASE request")
        leaseID = try reader.u64()
        try reader.finish()
    }
}

/// `ALLOC` request: `u32 count`, then `count × u64 bytes`, at most `maxExtents` sizes (one
/// extent each in the reply). Sizes are not checked for alignment: the spec asks it only of the
/// reply's extents.
public struct Alloc: WireBody {
    public var byteCounts: [UInt64]

    public init(byteCounts: [UInt64]) { self.byteCounts = byteCounts }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        guard byteCounts.count <= ProtocolLimits.maxExtents else {
            throw .tooLarge(what: "ALLOC request sizes (entries)", size: UInt64(byteCounts.count), limit: UInt64(ProtocolLimits.maxExtents))
        }
        writer.u32(UInt32(byteCounts.count))
        for bytes in byteCounts { writer.u64(bytes) }
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "ALLOC request")
        let count = try reader.count("sizes", limit: ProtocolLimits.maxExtents, elementBytes: 8)
        var byteCounts: [UInt64] = []
        byteCounts.reserveCapacity(count)
        for _ in 0..<count { byteCounts.append(try reader.u64()) }
        self.byteCounts = byteCounts
        try reader.finish()
    }
}

/// `ALLOC` reply: `u64 leaseID`, `extents` (`tokens` zero).
public struct AllocReply: WireBody {
    public var leaseID: UInt64
    public var extents: [WireExtent]

    public init(leaseID: UInt64, extents: [WireExtent]) {
        self.leaseID = leaseID
        self.extents = extents
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        writer.u64(leaseID)
        try writer.wireExtents(extents, field: "extents")
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "ALLOC reply")
        leaseID = try reader.u64()
        extents = try reader.extents("extents")
        try reader.finish()
    }
}
