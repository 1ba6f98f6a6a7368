import KVTierCore
@testable import KVTierProtocol
import Testing

@Suite struct FrameDecoderTests {
    /// A few frames of different sizes, requests and replies.
    private func sampleStream() throws -> (bytes: [UInt8], frames: [Frame]) {
        var generator = MessageGenerator(seed: 42, maxList: 12)
        var bytes: [UInt8] = []
        for (index, opcode) in [Opcode.hello, .lookup, .ping, .put, .status].enumerated() {
            bytes += try generator.request(opcode).encodeFrame(requestID: UInt32(index))
            bytes += try generator.reply(opcode).encodeFrame(requestID: UInt32(index))
        }
        return (bytes, try decodeFrames(bytes))
    }

    @Test func framesSplitAtEveryByteBoundaryDecodeTheSame() throws {
        let (bytes, expected) = try sampleStream()
        #expect(expected.count == 10)
        for cut in 0...bytes.count {
            var decoder = FrameDecoder()
            var frames: [Frame] = []
            decoder.append(Array(bytes[..<cut]))
            while let frame = try decoder.nextFrame() { frames.append(frame) }
            decoder.append(Array(bytes[cut...]))
            while let frame = try decoder.nextFrame() { frames.append(frame) }
            #expect(frames == expected, "cut at \(cut)")
            #expect(decoder.bufferedBytes == 0 && !decoder.isMidFrame)
        }
    }

    @Test func framesFedOneByteAtATimeDecodeTheSame() throws {
        let (bytes, expected) = try sampleStream()
        var decoder = FrameDecoder()
        var frames: [Frame] = []
        for byte in bytes {
            decoder.append([byte])
            while let frame = try decoder.nextFrame() { frames.append(frame) }
        }
        #expect(frames == expected)
    }

    @Test func manyFramesInOneAppend() throws {
        var bytes: [UInt8] = []
        let count = 20_000
        for id in 0..<count { bytes += try Request.release(Release(leaseID: UInt64(id))).encodeFrame(requestID: UInt32(id)) }
        var decoder = FrameDecoder()
        decoder.append(bytes)
        var seen = 0
        while let frame = try decoder.nextFrame() {
            #expect(try Request.decode(frame) == .release(Release(leaseID: UInt64(seen))))
            seen += 1
        }
        #expect(seen == count)
    }

    @Test func aBodyOverItsLimitIsRejectedFromTheHeaderAlone() throws {
        let control = UInt32(ProtocolLimits.maxControlBody)
        let inline = UInt32(ProtocolLimits.maxInlineBody)
        // Control frames: one byte over maxControlBody, with no body sent at all.
        for (opcode, flags) in [(Opcode.lookup.rawValue, UInt16(0)), (Opcode.get.rawValue, 0), (Opcode.put.rawValue, 1), (0x7777, 0)] {
            var decoder = FrameDecoder()
            decoder.append(header(bodyBytes: control + 1, opcode: opcode, flags: flags, requestID: 99))
            expectError(.tooLarge) { () throws(ProtocolError) in _ = try decoder.nextFrame() }
            #expect(decoder.currentHeader?.requestID == 99, "the error reply needs the request id")
            decoder.append([UInt8](repeating: 0, count: 4096))
            #expect(decoder.bufferedBytes == 0, "a spent decoder buffers nothing more")
        }
        // Inline frames (PUT requests, GET replies) may exceed maxControlBody but not maxInlineBody.
        for (opcode, flags) in [(Opcode.put.rawValue, UInt16(0)), (Opcode.get.rawValue, 1)] {
            var waiting = FrameDecoder()
            waiting.append(header(bodyBytes: inline, opcode: opcode, flags: flags))
            #expect(try waiting.nextFrame() == nil)
            #expect(waiting.isMidFrame)
            var over = FrameDecoder()
            over.append(header(bodyBytes: inline + 1, opcode: opcode, flags: flags))
            do {
                _ = try over.nextFrame()
                Issue.record("accepted a body over maxInlineBody")
            } catch {
                guard case .tooLarge(_, let size, let limit) = error else { Issue.record("\(error)"); continue }
                #expect(size == UInt64(inline) + 1 && limit == UInt64(inline))
            }
        }
        var huge = FrameDecoder()
        huge.append(header(bodyBytes: .max, opcode: Opcode.put.rawValue))
        #expect(throws: ProtocolError.self) { _ = try huge.nextFrame() }
    }

    @Test func unknownFlagBitsAreRejected() throws {
        for bit in 2..<16 {
            var decoder = FrameDecoder()
            decoder.append(header(bodyBytes: 0, opcode: Opcode.ping.rawValue, flags: 1 << bit))
            #expect(throws: ProtocolError.unsupportedFlags(1 << bit)) { _ = try decoder.nextFrame() }
            #expect(throws: ProtocolError.unsupportedFlags(1 << bit)) { _ = try decoder.nextFrame() }
            #expect(decoder.currentHeader?.requestID == 7, "the error reply needs the request id")
        }
    }

    @Test func requestsMustCarryStatusZero() throws {
        var decoder = FrameDecoder()
        decoder.append(header(bodyBytes: 0, opcode: Opcode.ping.rawValue, status: 3))
        #expect(throws: ProtocolError.self) { _ = try decoder.nextFrame() }
        var replies = FrameDecoder()
        replies.append(header(bodyBytes: 0, opcode: Opcode.ping.rawValue, flags: 1, status: 3))
        #expect(try replies.nextFrame()?.header.status == 3)
    }

    @Test func anUnknownOpcodeFrameIsDelimitedAndTheStreamGoesOn() throws {
        var decoder = FrameDecoder()
        decoder.append(header(bodyBytes: 5, opcode: 0x0999) + [1, 2, 3, 4, 5] + (try Request.ping.encodeFrame(requestID: 8)))
        let unknown = try #require(try decoder.nextFrame())
        #expect(throws: ProtocolError.unknownOpcode(0x0999)) { try Request.decode(unknown) }
        let ping = try #require(try decoder.nextFrame())
        #expect(try Request.decode(ping) == .ping && ping.header.requestID == 8)
    }

    @Test func encodersRefuseFramesOverTheirLimit() throws {
        let bytes = [UInt8](repeating: 1, count: ProtocolLimits.maxControlBody)
        let put = Request.put(Put(modelID: 1, tokens: [1], dataStart: 0, data: .inline(bytes)))
        #expect(try decodeOneFrame(put.encodeFrame(requestID: 1)).body.count > ProtocolLimits.maxControlBody)
        let getReply = Reply.get(GetReply(tokens: 1, leaseID: 1, data: .inline(bytes)))
        #expect(try Reply.decode(decodeOneFrame(getReply.encodeFrame(requestID: 1)), getInline: true) == getReply)
        let tooBig = Request.put(Put(modelID: 1, tokens: [1], dataStart: 0, data: .inline([UInt8](repeating: 0, count: ProtocolLimits.maxInlineBody))))
        #expect(throws: ProtocolError.self) { _ = try tooBig.encodeFrame(requestID: 1) }
        let counters = (0..<120_000).map { StatusCounter(name: "counter.\($0)", value: UInt64($0)) }
        #expect(throws: ProtocolError.self) { _ = try Reply.status(StatusReply(counters: counters)).encodeFrame(requestID: 1) }
    }
}
