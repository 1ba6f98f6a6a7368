import KVTierCore

/// Every reply of docs/protocol.md, plus the error reply any request may get.
public enum Reply: Sendable, Equatable {
    case hello(HelloReply)
    case ping
    case registerModel(RegisterModelReply)
    case lookup(LookupReply)
    case put(PutReply)
    case get(GetReply)
    case release
    case alloc(AllocReply)
    case sessionList(SessionListReply)
    case sessionInfo(SessionInfo)
    case sessionPin
    case sessionTTL
    case sessionFork(SessionInfo)
    case sessionDelete
    case sessionTokens(SessionTokensReply)
    case attention
    case querySample
    case status(StatusReply)
    case pages(PagesReply)
    case evict(EvictReply)
    case models(ModelsReply)
    case codecs(CodecsReply)
    case vramPool(VramPoolReply)
    case vramPlace(VramPlaceReply)
    case vramCommit
    case vramLease(VramLeaseReply)
    case vramDrop(VramDropReply)
    /// A non-zero status, answering a request of `opcode` (raw: unknown opcodes get one too).
    case error(opcode: UInt16, ErrorReply)

    /// The opcode of the request this answers.
    public var opcode: UInt16 {
        let known: Opcode
        switch self {
        case .error(let opcode, _): return opcode
        case .hello: known = .hello
        case .ping: known = .ping
        case .registerModel: known = .registerModel
        case .lookup: known = .lookup
        case .put: known = .put
        case .get: known = .get
        case .release: known = .release
        case .alloc: known = .alloc
        case .sessionList: known = .sessionList
        case .sessionInfo: known = .sessionInfo
        case .sessionPin: known = .sessionPin
        case .sessionTTL: known = .sessionTTL
        case .sessionFork: known = .sessionFork
        case .sessionDelete: known = .sessionDelete
        case .sessionTokens: known = .sessionTokens
        case .attention: known = .attention
        case .querySample: known = .querySample
        case .status: known = .status
        case .pages: known = .pages
        case .evict: known = .evict
        case .models: known = .models
        case .codecs: known = .codecs
        case .vramPool: known = .vramPool
        case .vramPlace: known = .vramPlace
        case .vramCommit: known = .vramCommit
        case .vramLease: known = .vramLease
        case .vramDrop: known = .vramDrop
        }
        return known.rawValue
    }

    /// The header's status: 0, or the error code.
    public var status: UInt32 {
        if case .error(_, let error) = self { return error.status }
        return 0
    }

    /// The flags of this reply's frame: a `HELLO` reply offering shared memory carries the
    /// arena's descriptor, and no other reply carries any.
    public var frameFlags: FrameFlags {
        if case .hello(let hello) = self, hello.capabilities.contains(.sharedMemory) { return [.reply, .fileDescriptors] }
        return .reply
    }

    public func encodeBody(into writer: inout ByteWriter) throws(ProtocolError) {
        switch self {
        case .ping, .release, .sessionPin, .sessionTTL, .sessionDelete, .attention, .querySample, .vramCommit: break
        case .hello(let body): try body.encode(into: &writer)
        case .registerModel(let body): try body.encode(into: &writer)
        case .lookup(let body): try body.encode(into: &writer)
        case .put(let body): try body.encode(into: &writer)
        case .get(let body): try body.encode(into: &writer)
        case .alloc(let body): try body.encode(into: &writer)
        case .sessionList(let body): try body.encode(into: &writer)
        case .sessionInfo(let body), .sessionFork(let body): try body.encode(into: &writer)
        case .sessionTokens(let body): try body.encode(into: &writer)
        case .status(let body): try body.encode(into: &writer)
        case .pages(let body): try body.encode(into: &writer)
        case .evict(let body): try body.encode(into: &writer)
        case .models(let body): try body.encode(into: &writer)
        case .codecs(let body): try body.encode(into: &writer)
        case .vramPool(let body): try body.encode(into: &writer)
        case .vramPlace(let body): try body.encode(into: &writer)
        case .vramLease(let body): try body.encode(into: &writer)
        case .vramDrop(let body): try body.encode(into: &writer)
        case .error(_, let body): try body.encode(into: &writer)
        }
    }

    /// Header and body, ready to send; throws for anything over a limit.
    public func encodeFrame(requestID: UInt32) throws(ProtocolError) -> [UInt8] {
        try Frame.encode(opcode: opcode, flags: frameFlags, requestID: requestID, status: status) { (writer) throws(ProtocolError) in
            try encodeBody(into: &writer)
        }
    }

    /// The reply a frame carries. `getInline` is the `inline` flag of the request when it was a
    /// `GET` (its reply's body does not say which form its pages take).
    public static func decode(_ frame: Frame, getInline: Bool = false) throws(ProtocolError) -> Reply {
        let header = frame.header
        guard header.isReply else { throw .malformed("frame \(header.requestID) is a request where a reply was expected") }
        return try withRawBytes(frame.body) { (body) throws(ProtocolError) -> Reply in
            if header.status != 0 {
                guard !header.flags.contains(.fileDescriptors) else {
                    throw .malformed("error reply \(header.requestID) announces file descriptors")
                }
                return .error(opcode: header.opcode, try ErrorReply(status: header.status, decoding: body))
            }
            guard let opcode = header.knownOpcode else { throw .unknownOpcode(header.opcode) }
            let reply = try decodeBody(opcode: opcode, body, getInline: getInline)
            guard header.flags == reply.frameFlags else {
                throw .malformed("\(opcode) reply \(header.requestID): file descriptors are attached exactly when a HELLO reply offers shared memory")
            }
            return reply
        }
    }

    static func decodeBody(opcode: Opcode, _ body: UnsafeRawBufferPointer, getInline: Bool) throws(ProtocolError) -> Reply {
        switch opcode {
        case .hello: return .hello(try HelloReply(decoding: body))
        case .ping: try expectEmpty(body, opcode, reply: true); return .ping
        case .registerModel: return .registerModel(try RegisterModelReply(decoding: body))
        case .lookup: return .lookup(try LookupReply(decoding: body))
        case .put: return .put(try PutReply(decoding: body))
        case .get: return .get(try GetReply(decoding: body, inline: getInline))
        case .release: try expectEmpty(body, opcode, reply: true); return .release
        case .alloc: return .alloc(try AllocReply(decoding: body))
        case .sessionList: return .sessionList(try SessionListReply(decoding: body))
        case .sessionInfo: return .sessionInfo(try SessionInfo(decoding: body))
        case .sessionPin: try expectEmpty(body, opcode, reply: true); return .sessionPin
        case .sessionTTL: try expectEmpty(body, opcode, reply: true); return .sessionTTL
        case .sessionFork: return .sessionFork(try SessionInfo(decoding: body))
        case .sessionDelete: try expectEmpty(body, opcode, reply: true); return .sessionDelete
        case .sessionTokens: return .sessionTokens(try SessionTokensReply(decoding: body))
        case .attention: try expectEmpty(body, opcode, reply: true); return .attention
        case .querySample: try expectEmpty(body, opcode, reply: true); return .querySample
        case .status: return .status(try StatusReply(decoding: body))
        case .pages: return .pages(try PagesReply(decoding: body))
        case .evict: return .evict(try EvictReply(decoding: body))
        case .models: return .models(try ModelsReply(decoding: body))
        case .codecs: return .codecs(try CodecsReply(decoding: body))
        case .vramPool: return .vramPool(try VramPoolReply(decoding: body))
        case .vramPlace: return .vramPlace(try VramPlaceReply(decoding: body))
        case .vramCommit: try expectEmpty(body, opcode, reply: true); return .vramCommit
        case .vramLease: return .vramLease(try VramLeaseReply(decoding: body))
        case .vramDrop: return .vramDrop(try VramDropReply(decoding: body))
        }
    }
}
