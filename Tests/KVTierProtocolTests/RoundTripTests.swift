import KVTierCore
@testable import KVTierProtocol
import Testing

@Suite struct RoundTripTests {
    static let iterations = 200

    @Test func everyRequestSurvivesFrameEncodeAndDecode() throws {
        let seed = testSeed("everyRequestSurvivesFrameEncodeAndDecode")
        var generator = MessageGenerator(seed: seed)
        for opcode in Opcode.allCases {
            for iteration in 0..<Self.iterations {
                let request = generator.request(opcode)
                let requestID = generator.u32()
                let bytes = try request.encodeFrame(requestID: requestID)
                let frame = try decodeOneFrame(bytes)
                #expect(frame.header.opcode == opcode.rawValue && frame.header.requestID == requestID && frame.header.flags == [])
                let decoded = try Request.decode(frame)
                #expect(decoded == request, "\(opcode) #\(iteration), seed \(seed)")
                #expect(frame.bytes == bytes)
            }
        }
    }

    @Test func everyReplySurvivesFrameEncodeAndDecode() throws {
        let seed = testSeed("everyReplySurvivesFrameEncodeAndDecode")
        var generator = MessageGenerator(seed: seed)
        for opcode in Opcode.allCases {
            for iteration in 0..<Self.iterations {
                let reply = generator.reply(opcode)
                let bytes = try reply.encodeFrame(requestID: UInt32(iteration))
                let frame = try decodeOneFrame(bytes)
                #expect(frame.header.isReply && frame.header.status == reply.status)
                let decoded = try Reply.decode(frame, getInline: reply.isInlineGet)
                #expect(decoded == reply, "\(opcode) #\(iteration), seed \(seed)")
            }
        }
    }

    @Test func bodyDecodersReadWhatBodyEncodersWrite() throws {
        let seed = testSeed("bodyDecodersReadWhatBodyEncodersWrite")
        var generator = MessageGenerator(seed: seed)
        for _ in 0..<Self.iterations {
            let info = generator.sessionInfo()
            #expect(try SessionInfo(decoding: info.encodedBody()) == info)
            let put = Put(modelID: generator.u64(), tokens: generator.tokens(), dataStart: 0, data: generator.pageData())
            #expect(try Put(decoding: put.encodedBody()) == put)
            let get = GetReply(tokens: 3, leaseID: generator.u64(), data: generator.pageData())
            var writer = ByteWriter()
            try get.encode(into: &writer)
            #expect(try GetReply(decoding: writer.bytes, inline: get.data.isInline) == get)
        }
    }

    @Test func helloReplyCarriesADescriptorExactlyWhenItOffersSharedMemory() throws {
        let offered = Reply.hello(HelloReply(tenant: TenantID(1000), capabilities: .sharedMemory, arenaBytes: 1 << 30))
        let plain = Reply.hello(HelloReply(tenant: TenantID(1000), capabilities: [], arenaBytes: 0))
        #expect(try decodeOneFrame(offered.encodeFrame(requestID: 1)).header.flags == [.reply, .fileDescriptors])
        #expect(try decodeOneFrame(plain.encodeFrame(requestID: 1)).header.flags == [.reply])
        var lying = try decodeOneFrame(plain.encodeFrame(requestID: 1))
        lying.header.flags = [.reply, .fileDescriptors]
        #expect(throws: ProtocolError.self) { try Reply.decode(lying) }
        var pingWithDescriptor = try decodeOneFrame(Reply.ping.encodeFrame(requestID: 2))
        pingWithDescriptor.header.flags.insert(.fileDescriptors)
        #expect(throws: ProtocolError.self) { try Reply.decode(pingWithDescriptor) }
    }

    @Test func requestsAndRepliesAreNotConfused() throws {
        let request = try decodeOneFrame(Request.ping.encodeFrame(requestID: 1))
        let reply = try decodeOneFrame(Reply.ping.encodeFrame(requestID: 1))
        #expect(throws: ProtocolError.self) { try Reply.decode(request) }
        #expect(throws: ProtocolError.self) { try Request.decode(reply) }
    }

    @Test func unknownOpcodeKeepsTheConnectionAndGetsAnErrorReply() throws {
        let frame = try decodeOneFrame(header(bodyBytes: 3, opcode: 0x7777) + [1, 2, 3])
        #expect(throws: ProtocolError.unknownOpcode(0x7777)) { try Request.decode(frame) }
        #expect(ProtocolError.unknownOpcode(0x7777).closesConnection == false)
        #expect(ProtocolError.malformed("x").closesConnection)
        let reply = Reply.error(opcode: 0x7777, ErrorReply(ProtocolError.unknownOpcode(0x7777)))
        let decoded = try Reply.decode(decodeOneFrame(reply.encodeFrame(requestID: frame.header.requestID)))
        #expect(decoded == reply)
        guard case .error(_, let error) = decoded else { Issue.record("not an error reply"); return }
        #expect(error.error == .unknownOpcode && error.message.contains("0x7777"))
    }

    @Test func errorCodesAreStableAndProtocolErrorsMapToThem() {
        #expect(WireError.allCases.map(\.rawValue) == Array(1...12))
        #expect(WireError.allCases.map(\.name) == [
            "malformed", "unsupportedVersion", "tooLarge", "unknownOpcode", "notFound", "permissionDenied",
            "overBudget", "invalidArgument", "outOfOrder", "internal", "unavailable", "timeout",
        ])
        #expect(ProtocolError.malformed("x").wireError == .malformed)
        #expect(ProtocolError.unsupportedFlags(4).wireError == .malformed)
        #expect(ProtocolError.tooLarge(what: "x", size: 2, limit: 1).wireError == .tooLarge)
        #expect(ProtocolError.unknownOpcode(9).wireError == .unknownOpcode)
        #expect(Opcode.allCases.map(\.rawValue) == [0x01, 0x02, 0x10, 0x20, 0x21, 0x22, 0x23, 0x24, 0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x40, 0x50, 0x51, 0x52, 0x53])
    }

    @Test func longErrorMessagesAreCutAtACharacterBoundary() throws {
        let reply = ErrorReply(.internal, message: String(repeating: "漢", count: 400))
        #expect(reply.message.utf8.count == 1023)
        #expect(try ErrorReply(status: 10, decoding: reply.encodedBodyForTest()) == reply)
    }

    @Test func versionNegotiationPicksTheHighestCommonVersion() {
        #expect(ProtocolVersion.negotiate(minVersion: 1, maxVersion: 5) == 1)
        #expect(ProtocolVersion.negotiate(minVersion: 0, maxVersion: 1) == 1)
        #expect(ProtocolVersion.negotiate(minVersion: 2, maxVersion: 3) == nil)
        #expect(ProtocolVersion.negotiate(minVersion: 1, maxVersion: 0) == nil)
    }
}

extension ErrorReply {
    func encodedBodyForTest() throws(ProtocolError) -> [UInt8] {
        var writer = ByteWriter()
        try encode(into: &writer)
        return writer.bytes
    }
}
