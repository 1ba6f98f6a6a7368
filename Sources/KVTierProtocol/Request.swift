import KVTierCore

/// Every request of docs/protocol.md: the one dispatch table the daemon and clients share.
public enum Request: Sendable, Equatable {
    case hello(Hello)
    case ping
    case registerModel(RegisterModel)
    case lookup(Lookup)
    case put(Put)
    case get(Get)
    case release(Release)
    case alloc(Alloc)
    case sessionList(ListPage)
    case sessionInfo(SessionName)
    case sessionPin(SessionPin)
    case sessionTTL(SessionTTL)
    case sessionFork(SessionFork)
    case sessionDelete(SessionName)
    case sessionTokens(SessionName)
    case attention(Attention)
    case querySample(QuerySample)
    case status
    case pages(Pages)
    case evict(Evict)
    case models(ListPage)
    case codecs(ListPage)
    case vramPool(VramPool)
    case vramPlace(VramPlace)
    case vramCommit(VramCommit)
    case vramLease(VramLease)
    case vramDrop(VramDrop)

    public var opcode: Opcode {
        switch self {
        case .hello: .hello
        case .ping: .ping
        case .registerModel: .registerModel
        case .lookup: .lookup
        case .put: .put
        case .get: .get
        case .release: .release
        case .alloc: .alloc
        case .sessionList: .sessionList
        case .sessionInfo: .sessionInfo
        case .sessionPin: .sessionPin
        case .sessionTTL: .sessionTTL
        case .sessionFork: .sessionFork
        case .sessionDelete: .sessionDelete
        case .sessionTokens: .sessionTokens
        case .attention: .attention
        case .querySample: .querySample
        case .status: .status
        case .pages: .pages
        case .evict: .evict
        case .models: .models
        case .codecs: .codecs
        case .vramPool: .vramPool
        case .vramPlace: .vramPlace
        case .vramCommit: .vramCommit
        case .vramLease: .vramLease
        case .vramDrop: .vramDrop
        }
    }

    /// The body alone.
    public func encodeBody(into writer: inout ByteWriter) throws(ProtocolError) {
        switch self {
        case .ping, .status: break
        case .sessionList(let body), .models(let body), .codecs(let body): try body.encode(into: &writer)
        case .hello(let body): try body.encode(into: &writer)
        case .registerModel(let body): try body.encode(into: &writer)
        case .lookup(let body): try body.encode(into: &writer)
        case .put(let body): try body.encode(into: &writer)
        case .get(let body): try body.encode(into: &writer)
        case .release(let body): try body.encode(into: &writer)
        case .alloc(let body): try body.encode(into: &writer)
        case .sessionInfo(let body), .sessionDelete(let body), .sessionTokens(let body): try body.encode(into: &writer)
        case .sessionPin(let body): try body.encode(into: &writer)
        case .sessionTTL(let body): try body.encode(into: &writer)
        case .sessionFork(let body): try body.encode(into: &writer)
        case .attention(let body): try body.encode(into: &writer)
        case .querySample(let body): try body.encode(into: &writer)
        case .pages(let body): try body.encode(into: &writer)
        case .evict(let body): try body.encode(into: &writer)
        case .vramPool(let body): try body.encode(into: &writer)
        case .vramPlace(let body): try body.encode(into: &writer)
        case .vramCommit(let body): try body.encode(into: &writer)
        case .vramLease(let body): try body.encode(into: &writer)
        case .vramDrop(let body): try body.encode(into: &writer)
        }
    }

    /// Header and body, ready to send; throws for anything over a limit.
    public func encodeFrame(requestID: UInt32) throws(ProtocolError) -> [UInt8] {
        try Frame.encode(opcode: opcode.rawValue, flags: [], requestID: requestID) { (writer) throws(ProtocolError) in
            try encodeBody(into: &writer)
        }
    }

    /// The request a frame carries. `unknownOpcode` leaves the connection usable; every other
    /// error closes it (`ProtocolError.closesConnection`).
    public static func decode(_ frame: Frame) throws(ProtocolError) -> Request {
        let header = frame.header
        guard !header.isReply else { throw .malformed("frame \(header.requestID) is a reply where a request was expected") }
        guard header.status == 0 else { throw .malformed("request \(header.requestID) has status \(header.status); requests carry 0") }
        guard !header.flags.contains(.fileDescriptors) else {
            throw .malformed("request \(header.requestID) announces file descriptors; no request carries any")
        }
        guard let opcode = header.knownOpcode else { throw .unknownOpcode(header.opcode) }
        return try withRawBytes(frame.body) { (body) throws(ProtocolError) -> Request in
            try decodeBody(opcode: opcode, body)
        }
    }

    static func decodeBody(opcode: Opcode, _ body: UnsafeRawBufferPointer) throws(ProtocolError) -> Request {
        switch opcode {
        case .hello: return .hello(try Hello(decoding: body))
        case .ping: try expectEmpty(body, opcode); return .ping
        case .registerModel: return .registerModel(try RegisterModel(decoding: body))
        case .lookup: return .lookup(try Lookup(decoding: body))
        case .put: return .put(try Put(decoding: body))
        case .get: return .get(try Get(decoding: body))
        case .release: return .release(try Release(decoding: body))
        case .alloc: return .alloc(try Alloc(decoding: body))
        case .sessionList: return .sessionList(try ListPage(decoding: body, context: "SESSION_LIST request"))
        case .sessionInfo: return .sessionInfo(try SessionName(decoding: body))
        case .sessionPin: return .sessionPin(try SessionPin(decoding: body))
        case .sessionTTL: return .sessionTTL(try SessionTTL(decoding: body))
        case .sessionFork: return .sessionFork(try SessionFork(decoding: body))
        case .sessionDelete: return .sessionDelete(try SessionName(decoding: body))
        case .sessionTokens: return .sessionTokens(try SessionName(decoding: body))
        case .attention: return .attention(try Attention(decoding: body))
        case .querySample: return .querySample(try QuerySample(decoding: body))
        case .status: try expectEmpty(body, opcode); return .status
        case .pages: return .pages(try Pages(decoding: body))
        case .evict: return .evict(try Evict(decoding: body))
        case .models: return .models(try ListPage(decoding: body, context: "MODELS request"))
        case .codecs: return .codecs(try ListPage(decoding: body, context: "CODECS request"))
        case .vramPool: return .vramPool(try VramPool(decoding: body))
        case .vramPlace: return .vramPlace(try VramPlace(decoding: body))
        case .vramCommit: return .vramCommit(try VramCommit(decoding: body))
        case .vramLease: return .vramLease(try VramLease(decoding: body))
        case .vramDrop: return .vramDrop(try VramDrop(decoding: body))
        }
    }
}

/// An empty body must be empty.
func expectEmpty(_ body: UnsafeRawBufferPointer, _ opcode: Opcode, reply: Bool = false) throws(ProtocolError) {
    guard body.isEmpty else {
        throw .malformed("\(opcode) \(reply ? "reply" : "request") has an empty body but \(body.count) bytes came")
    }
}
