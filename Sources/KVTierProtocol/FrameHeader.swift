import KVTierCore

/// The 16 bytes before every body: `u32 bodyBytes`, `u16 opcode`, `u16 flags`, `u32 requestID`,
/// `u32 status`. The opcode stays raw so an unknown one can still be answered (with
/// `unknownOpcode`) without closing the connection.
public struct FrameHeader: Sendable, Hashable {
    public var bodyBytes: UInt32
    public var opcode: UInt16
    public var flags: FrameFlags
    public var requestID: UInt32
    /// 0 in requests; in replies 0 for success or a `WireError` code.
    public var status: UInt32

    public init(bodyBytes: UInt32, opcode: UInt16, flags: FrameFlags, requestID: UInt32, status: UInt32 = 0) {
        self.bodyBytes = bodyBytes
        self.opcode = opcode
        self.flags = flags
        self.requestID = requestID
        self.status = status
    }

    public var isReply: Bool { flags.contains(.reply) }
    /// The opcode, when it is one of the spec's.
    public var knownOpcode: Opcode? { Opcode(rawValue: opcode) }

    public func encode(into writer: inout ByteWriter) {
        writer.u32(bodyBytes)
        writer.u16(opcode)
        writer.u16(flags.rawValue)
        writer.u32(requestID)
        writer.u32(status)
    }

    /// Reads the first 16 bytes of `bytes` and rejects undefined flag bits and requests with a
    /// non-zero status. The body size is checked by `validateBodySize`.
    public init(decoding bytes: UnsafeRawBufferPointer) throws(ProtocolError) {
        let (header, rawFlags) = try Self.readFields(bytes)
        try header.check(rawFlags: rawFlags)
        self = header
    }

    /// The fields as sent, flags cut to the known bits, plus the flags as sent: enough to
    /// address an error reply to a header that is about to be rejected.
    static func readFields(_ bytes: UnsafeRawBufferPointer) throws(ProtocolError) -> (FrameHeader, rawFlags: UInt16) {
        var reader = ByteReader(bytes)
        do {
            let bodyBytes = try reader.u32()
            let opcode = try reader.u16()
            let rawFlags = try reader.u16()
            let requestID = try reader.u32()
            let status = try reader.u32()
            let header = FrameHeader(bodyBytes: bodyBytes, opcode: opcode, flags: FrameFlags(rawValue: rawFlags).intersection(.known),
                                     requestID: requestID, status: status)
            return (header, rawFlags)
        } catch {
            throw .malformed("a frame header is \(ProtocolLimits.frameHeaderBytes) bytes: \(error)")
        }
    }

    /// Rejects undefined flag bits and requests with a non-zero status.
    func check(rawFlags: UInt16) throws(ProtocolError) {
        _ = try FrameFlags(validating: rawFlags)
        guard isReply || status == 0 else {
            throw .malformed("request \(requestID) has status \(status); requests carry status 0")
        }
    }

    /// The largest body this frame may have: `PUT` requests and `GET` replies may carry inline
    /// page bytes, every other frame is a control frame.
    public static func bodyLimit(
        opcode: UInt16, isReply: Bool,
        maxControlBody: Int = ProtocolLimits.maxControlBody, maxInlineBody: Int = ProtocolLimits.maxInlineBody
    ) -> Int {
        switch (Opcode(rawValue: opcode), isReply) {
        case (.put?, false), (.get?, true): maxInlineBody
        default: maxControlBody
        }
    }

    /// Throws `tooLarge` when `bodyBytes` exceeds this frame's limit.
    public func validateBodySize(
        maxControlBody: Int = ProtocolLimits.maxControlBody, maxInlineBody: Int = ProtocolLimits.maxInlineBody
    ) throws(ProtocolError) {
        let limit = Self.bodyLimit(opcode: opcode, isReply: isReply, maxControlBody: maxControlBody, maxInlineBody: maxInlineBody)
        guard Int(bodyBytes) <= limit else {
            let kind = knownOpcode.map { "\($0)" } ?? "opcode 0x\(String(opcode, radix: 16))"
            throw .tooLarge(what: "body of \(kind) \(isReply ? "reply" : "request") \(requestID) (bytes)",
                            size: UInt64(bodyBytes), limit: UInt64(limit))
        }
    }
}

/// One whole frame as read from a connection.
public struct Frame: Sendable, Equatable {
    public var header: FrameHeader
    public var body: [UInt8]

    public init(header: FrameHeader, body: [UInt8]) {
        precondition(Int(header.bodyBytes) == body.count, "header.bodyBytes must equal body.count")
        self.header = header
        self.body = body
    }

    /// Header and body as sent on the wire.
    public var bytes: [UInt8] {
        var writer = ByteWriter(capacity: ProtocolLimits.frameHeaderBytes + body.count)
        header.encode(into: &writer)
        writer.raw(body)
        return writer.bytes
    }

    /// Encodes a frame whose body `encodeBody` writes, straight into one buffer (no copy of a
    /// large inline body), and checks the body against its limit.
    static func encode(
        opcode: UInt16, flags: FrameFlags, requestID: UInt32, status: UInt32 = 0,
        body encodeBody: (inout ByteWriter) throws(ProtocolError) -> Void
    ) throws(ProtocolError) -> [UInt8] {
        var writer = ByteWriter(capacity: 64)
        FrameHeader(bodyBytes: 0, opcode: opcode, flags: flags, requestID: requestID, status: status).encode(into: &writer)
        try encodeBody(&writer)
        let bodyBytes = writer.count - ProtocolLimits.frameHeaderBytes
        let header = FrameHeader(bodyBytes: UInt32(clamping: bodyBytes), opcode: opcode, flags: flags,
                                 requestID: requestID, status: status)
        guard bodyBytes <= UInt32.max else {
            throw .tooLarge(what: "frame body (bytes)", size: UInt64(bodyBytes), limit: UInt64(UInt32.max))
        }
        try header.validateBodySize()
        writer.patchU32(UInt32(bodyBytes), at: 0)
        return writer.bytes
    }
}
