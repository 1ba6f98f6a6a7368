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

    /// `REGISTER_MODEL`'s optional trailing `diskCodec`: absent is the body of before, byte for
    /// byte; present (even empty) it is a trailing string; in a `MODELS` entry the reserved
    /// byte after `elementType` says whether it follows.
    @Test func registerModelsDiskCodecIsATrailingStringOnlyWhenGiven() throws {
        let fixed = body { w in
            w.u16(2); w.raw("m7".utf8); w.u16(4); w.u16(8); w.u16(128); w.u8(2); w.u8(0); w.u16(0); w.u32(Float(10_000).bitPattern)
        }
        let old = RegisterModel(name: "m7", layers: 4, kvHeads: 8, headDim: 128, elementType: .bfloat16, ropeTheta: 10_000)
        #expect(try old.encodedBody() == fixed, "no codec: exactly the old body")
        #expect(try RegisterModel(decoding: fixed) == old)
        #expect(try RegisterModel(decoding: fixed).diskCodec == nil)
        for codec in ["", "fp16", "tq3m+zstd(3)"] {
            var model = old
            model.diskCodec = codec
            let bytes = fixed + body { w in w.u16(UInt16(codec.utf8.count)); w.raw(codec.utf8) }
            #expect(try model.encodedBody() == bytes, "\(codec)")
            #expect(try RegisterModel(decoding: bytes) == model, "\(codec)")
        }
        expectError(.malformed, "half a length") { () throws(ProtocolError) in _ = try RegisterModel(decoding: fixed + [4]) }
        expectError(.malformed, "shorter than its length") { () throws(ProtocolError) in _ = try RegisterModel(decoding: fixed + [4, 0, 0x66]) }
        expectError(.malformed, "bytes after the codec") { () throws(ProtocolError) in _ = try RegisterModel(decoding: fixed + [1, 0, 0x66, 0]) }

        // MODELS: an entry without a codec is as before; one with it sets the reserved byte.
        var coded = old
        coded.diskCodec = "fp16"
        let reply = ModelsReply(total: 2, models: [ModelEntry(modelID: 1, registration: coded), ModelEntry(modelID: 2, registration: old)])
        var entryWithCodec = fixed
        entryWithCodec[2 + 2 + 7] = 1
        let expected = body { w in w.u32(2); w.u32(2); w.u64(1) } + entryWithCodec + [4, 0] + Array("fp16".utf8)
            + body { w in w.u64(2) } + fixed
        #expect(try reply.encodedBody() == expected)
        #expect(try ModelsReply(decoding: expected) == reply)
        var bad = expected
        bad[8 + 8 + 2 + 2 + 7] = 2
        expectError(.malformed, "reserved byte 2") { () throws(ProtocolError) in _ = try ModelsReply(decoding: bad) }
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
        #expect(Opcode.allCases.map(\.rawValue) == [0x01, 0x02, 0x10, 0x20, 0x21, 0x22, 0x23, 0x24, 0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x40, 0x41, 0x50, 0x51, 0x52, 0x53, 0x54,
                                                     0x60, 0x61, 0x62, 0x63, 0x64])
    }

    @Test func longErrorMessagesAreCutAtACharacterBoundary() throws {
        let reply = ErrorReply(.internal, message: String(repeating: "漢", count: 400))
        #expect(reply.message.utf8.count == 1023)
        #expect(try ErrorReply(status: 10, decoding: reply.encodedBodyForTest()) == reply)
    }

    @Test func versionNegotiationPicksTheHighestCommonVersion() {
        #expect(ProtocolVersion.current == 2 && ProtocolVersion.oldestSupported == 2)
        #expect(ProtocolVersion.negotiate(minVersion: 1, maxVersion: 5) == 2)
        #expect(ProtocolVersion.negotiate(minVersion: 0, maxVersion: 2) == 2)
        #expect(ProtocolVersion.negotiate(minVersion: 1, maxVersion: 1) == nil, "version 1 LOOKUP replies lack vramTokens")
        #expect(ProtocolVersion.negotiate(minVersion: 3, maxVersion: 4) == nil)
        #expect(ProtocolVersion.negotiate(minVersion: 2, maxVersion: 0) == nil)
    }
}

extension ErrorReply {
    func encodedBodyForTest() throws(ProtocolError) -> [UInt8] {
        var writer = ByteWriter()
        try encode(into: &writer)
        return writer.bytes
    }
}
