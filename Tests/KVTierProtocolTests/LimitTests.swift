import KVTierCore
@testable import KVTierProtocol
import Testing

/// Lists and strings at their limit pass, one over is rejected (by the encoder, and by the
/// decoder from the count alone), and every field the spec constrains is checked.
@Suite struct LimitTests {
    static let maxTokens = ProtocolLimits.maxTokensPerRequest
    static let maxExtents = ProtocolLimits.maxExtents
    static let maxString = ProtocolLimits.maxStringBytes

    @Test func tokenListsAtTheLimitPassAndOneOverIsRejected() throws {
        let tokens = (0..<Self.maxTokens).map { UInt32($0) }
        // A PUT may carry the most tokens, since its frame may be up to maxInlineBody.
        let put = Request.put(Put(modelID: 1, tokens: tokens, dataStart: 0, data: .extents([])))
        #expect(try Request.decode(decodeOneFrame(put.encodeFrame(requestID: 1))) == put)
        let lookup = Lookup(modelID: 1, tokens: tokens)
        #expect(try Lookup(decoding: lookup.encodedBody()) == lookup)
        expectError(.tooLarge) { () throws(ProtocolError) in _ = try Lookup(modelID: 1, tokens: tokens + [0]).encodedBody() }
        let over = body { writer in
            writer.u64(1)
            writer.u32(UInt32(Self.maxTokens + 1))
            for token in 0...Self.maxTokens { writer.u32(UInt32(token)) }
        }
        expectError(.tooLarge) { () throws(ProtocolError) in _ = try Lookup(decoding: over) }
    }

    /// docs/protocol.md: `maxControlBody` leaves room for a full token list, so the token limit
    /// is the one that binds.
    @Test func aLookupOfTheMostTokensFitsAControlFrame() throws {
        let most = Request.lookup(Lookup(modelID: 1, tokens: [UInt32](repeating: 7, count: Self.maxTokens)))
        #expect(try Request.decode(decodeOneFrame(most.encodeFrame(requestID: 1))) == most)
    }

    /// docs/protocol.md: a page of `maxListEntries` entries with the longest names fits a
    /// control frame, so the daemon never builds a SESSION_LIST or MODELS reply it cannot send.
    @Test func aFullListPageOfTheLongestNamesFitsAControlFrame() throws {
        let name = String(repeating: "n", count: ProtocolLimits.maxStringBytes)
        let sessions = Reply.sessionList(SessionListReply(total: .max, sessions: Array(repeating: SessionEntry(
            name: name, modelID: .max, tokens: .max, pinned: true, ttlSeconds: .max, lastUsedMicros: .max), count: ProtocolLimits.maxListEntries)))
        let models = Reply.models(ModelsReply(total: .max, models: Array(repeating: ModelEntry(modelID: .max, registration: RegisterModel(
            name: name, layers: .max, kvHeads: .max, headDim: .max, elementType: .bfloat16, pageTokens: .max, ropeTheta: 1)),
            count: ProtocolLimits.maxListEntries)))
        for reply in [sessions, models] {
            let frame = try reply.encodeFrame(requestID: 1)
            #expect(frame.count - ProtocolLimits.frameHeaderBytes <= ProtocolLimits.maxControlBody)
        }
        expectError(.tooLarge) { () throws(ProtocolError) in
            _ = try Request.sessionList(ListPage(offset: 0, limit: UInt32(ProtocolLimits.maxListEntries + 1))).encodeFrame(requestID: 1)
        }
        expectError(.tooLarge) { () throws(ProtocolError) in _ = try ListPage(decoding: body { $0.u32(0); $0.u32(0) }, context: "MODELS request") }
    }

    @Test func hugeCountsAreRejectedFromTheCountAlone() throws {
        for count in [UInt32.max, UInt32(Self.maxTokens + 1), 1 << 31] {
            let lookup = body { $0.u64(1); $0.u32(count) }
            expectError(.tooLarge) { () throws(ProtocolError) in _ = try Lookup(decoding: lookup) }
            let alloc = body { $0.u32(count) }
            expectError(.tooLarge) { () throws(ProtocolError) in _ = try Alloc(decoding: alloc) }
            let extents = body { $0.u64(1); $0.u32(count) }
            expectError(.tooLarge) { () throws(ProtocolError) in _ = try AllocReply(decoding: extents) }
            let list = body { $0.u32(0); $0.u32(count) }  // total, then the count of a page
            expectError(.tooLarge) { () throws(ProtocolError) in _ = try SessionListReply(decoding: list) }
            expectError(.tooLarge) { () throws(ProtocolError) in _ = try ModelsReply(decoding: list) }
            let counters = body { $0.u32(count) }
            expectError(.tooLarge) { () throws(ProtocolError) in _ = try StatusReply(decoding: counters) }
        }
        // Within the limit but more than the body holds: malformed, and nothing allocated.
        let short = body { $0.u64(1); $0.u32(UInt32(Self.maxTokens)); $0.u32(5) }
        expectError(.malformed) { () throws(ProtocolError) in _ = try Lookup(decoding: short) }
        let inline = body { $0.u32(1); $0.u64(2); $0.u64(.max) }
        expectError(.malformed) { () throws(ProtocolError) in _ = try GetReply(decoding: inline, inline: true) }
    }

    @Test func extentListsAtTheLimitPassAndOneOverIsRejected() throws {
        let extents = (0..<Self.maxExtents).map { WireExtent(offset: UInt64($0) * 8192, bytes: 4096, tokens: 0) }
        let reply = Reply.alloc(AllocReply(leaseID: 5, extents: extents))
        #expect(try Reply.decode(decodeOneFrame(reply.encodeFrame(requestID: 1))) == reply)
        let request = Request.alloc(Alloc(byteCounts: [UInt64](repeating: 4096, count: Self.maxExtents)))
        #expect(try Request.decode(decodeOneFrame(request.encodeFrame(requestID: 1))) == request)
        let one = WireExtent(offset: 0, bytes: 4096, tokens: 0)
        expectError(.tooLarge) { () throws(ProtocolError) in _ = try AllocReply(leaseID: 5, extents: extents + [one]).encodedBody() }
        expectError(.tooLarge) { () throws(ProtocolError) in _ = try Alloc(byteCounts: [UInt64](repeating: 1, count: Self.maxExtents + 1)).encodedBody() }
        let over = body { writer in
            writer.u64(5)
            writer.u32(UInt32(Self.maxExtents + 1))
            for _ in 0...Self.maxExtents { writer.u64(0); writer.u64(4096); writer.u32(0) }
        }
        expectError(.tooLarge) { () throws(ProtocolError) in _ = try AllocReply(decoding: over) }
    }

    @Test func extentsMustBeAlignedAndNotWrap() throws {
        for bad in [WireExtent(offset: 1, bytes: 4096, tokens: 0), WireExtent(offset: 4096, bytes: 100, tokens: 0),
                    WireExtent(offset: UInt64.max - 4095, bytes: 8192, tokens: 0)] {
            expectError(.malformed) { () throws(ProtocolError) in _ = try AllocReply(leaseID: 1, extents: [bad]).encodedBody() }
            let raw = body { $0.u64(1); $0.u32(1); $0.u64(bad.offset); $0.u64(bad.bytes); $0.u32(0) }
            expectError(.malformed) { () throws(ProtocolError) in _ = try AllocReply(decoding: raw) }
        }
    }

    @Test func stringsAtTheLimitPassAndOneOverIsRejected() throws {
        let longest = String(repeating: "é", count: Self.maxString / 2)
        #expect(try SessionName(decoding: SessionName(longest).encodedBody()).name == longest)
        expectError(.tooLarge) { () throws(ProtocolError) in _ = try SessionName(longest + "a").encodedBody() }
        let over = body { $0.u16(UInt16(Self.maxString + 1)); $0.raw([UInt8](repeating: 0x61, count: Self.maxString + 1)) }
        expectError(.tooLarge) { () throws(ProtocolError) in _ = try SessionName(decoding: over) }
        let huge = body { $0.u16(.max) }
        expectError(.tooLarge) { () throws(ProtocolError) in _ = try SessionName(decoding: huge) }
    }

    @Test func stringsMustBeValidUTF8() {
        for invalid: [UInt8] in [[0xFF], [0xC3], [0xE6, 0xBC], [0xED, 0xA0, 0x80], [0xC0, 0xAF]] {
            let raw = body { $0.u16(UInt16(invalid.count)); $0.raw(invalid) }
            expectError(.malformed, "\(invalid)") { () throws(ProtocolError) in _ = try SessionName(decoding: raw) }
        }
    }

    @Test func trailingBytesAndTruncationAreMalformedForEveryBody() throws {
        var generator = MessageGenerator(seed: 7, maxList: 3)
        for opcode in Opcode.allCases {
            var writer = ByteWriter()
            try generator.request(opcode).encodeBody(into: &writer)
            let valid = writer.bytes
            expectError(.malformed, "\(opcode) request") { () throws(ProtocolError) in
                _ = try withRawBytes(valid + [0]) { (raw) throws(ProtocolError) in try Request.decodeBody(opcode: opcode, raw) }
            }
            if !valid.isEmpty {
                expectError(.malformed, "\(opcode) request") { () throws(ProtocolError) in
                    _ = try withRawBytes(Array(valid.dropLast())) { (raw) throws(ProtocolError) in try Request.decodeBody(opcode: opcode, raw) }
                }
            }
            var replyWriter = ByteWriter()
            var reply = generator.reply(opcode)
            while case .error = reply { reply = generator.reply(opcode) }
            try reply.encodeBody(into: &replyWriter)
            expectError(.malformed, "\(opcode) reply") { () throws(ProtocolError) in
                _ = try withRawBytes(replyWriter.bytes + [0]) { (raw) throws(ProtocolError) in
                    try Reply.decodeBody(opcode: opcode, raw, getInline: reply.isInlineGet)
                }
            }
        }
    }

    @Test func constrainedFieldsAreChecked() {
        let model = { (type: UInt8, zero: UInt8) in
            body { $0.u16(1); $0.u8(0x6D); $0.u16(1); $0.u16(1); $0.u16(64); $0.u8(type); $0.u8(zero); $0.u16(0); $0.u32(0) }
        }
        #expect((try? RegisterModel(decoding: model(1, 0))) != nil)
        expectError(.malformed) { () throws(ProtocolError) in _ = try RegisterModel(decoding: model(3, 0)) }
        expectError(.malformed) { () throws(ProtocolError) in _ = try RegisterModel(decoding: model(0, 0)) }
        expectError(.malformed) { () throws(ProtocolError) in _ = try RegisterModel(decoding: model(2, 1)) }
        let pin = { (value: UInt8) in body { $0.u16(1); $0.u8(0x73); $0.u8(value) } }
        #expect((try? SessionPin(decoding: pin(1)))?.pinned == true)
        expectError(.malformed) { () throws(ProtocolError) in _ = try SessionPin(decoding: pin(2)) }
        let put = { (flags: UInt8) in body { $0.u64(1); $0.u16(0); $0.u8(flags); $0.u32(0); $0.u32(0); $0.u64(0) } }
        #expect((try? Put(decoding: put(3))) == Put(modelID: 1, durable: true, tokens: [], dataStart: 0, data: .inline([])))
        expectError(.malformed) { () throws(ProtocolError) in _ = try Put(decoding: put(4)) }
        let get = { (flags: UInt8) in body { $0.u64(1); $0.u32(0); $0.u32(0); $0.u8(flags) } }
        #expect((try? Get(decoding: get(2)))?.inline == true)
        expectError(.malformed) { () throws(ProtocolError) in _ = try Get(decoding: get(1)) }
        // A page list (flag bit 2): strictly increasing, at most maxExtents, and maxTokens 0.
        let pages = { (maxTokens: UInt32, list: [UInt32], count: UInt32?) in
            body { w in
                w.u64(1); w.u32(0); w.u32(maxTokens); w.u8(4)
                w.u32(count ?? UInt32(list.count))
                for page in list { w.u32(page) }
            }
        }
        #expect((try? Get(decoding: pages(0, [0, 3, 9], nil)))?.pages == [0, 3, 9])
        #expect((try? Get(decoding: pages(0, [], nil)))?.pages == [])
        #expect((try? Get(decoding: get(0)))?.pages == nil)
        expectError(.malformed) { () throws(ProtocolError) in _ = try Get(decoding: pages(0, [3, 3], nil)) }
        expectError(.malformed) { () throws(ProtocolError) in _ = try Get(decoding: pages(0, [4, 2], nil)) }
        expectError(.malformed) { () throws(ProtocolError) in _ = try Get(decoding: pages(16, [1], nil)) }
        expectError(.malformed) { () throws(ProtocolError) in _ = try Get(decoding: pages(0, [1, 2], 3)) }
        expectError(.tooLarge) { () throws(ProtocolError) in
            _ = try Get(decoding: pages(0, [], UInt32(ProtocolLimits.maxExtents + 1)))
        }
        expectError(.malformed) { () throws(ProtocolError) in
            var writer = ByteWriter()
            try Get(modelID: 1, tokens: [], inline: false, pages: [2, 1]).encode(into: &writer)
        }
        expectError(.malformed) { () throws(ProtocolError) in _ = try withRawBytes([1]) { (raw) throws(ProtocolError) in try Request.decodeBody(opcode: .ping, raw) } }
    }
}
