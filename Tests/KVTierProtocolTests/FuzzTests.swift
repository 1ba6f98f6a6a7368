import KVTierCore
@testable import KVTierProtocol
import Testing

/// Random and mutated bytes through the frame decoder and every body decoder: each input either
/// decodes or throws a `ProtocolError`, never traps. A body that decodes must re-encode to the
/// very same bytes (the encoding is canonical), which also shows nothing was invented from an
/// announced size.
@Suite struct FuzzTests {
    static let randomInputs = 20_000
    static let mutatedInputs = 20_000

    @Test func randomBytes() throws {
        let seed = testSeed("FuzzTests.randomBytes")
        var random = SplitMix64(seed: seed)
        var decoded = 0
        for _ in 0..<Self.randomInputs {
            let length = Int(random.next() % 96)
            var bytes = (0..<length).map { _ in UInt8(truncatingIfNeeded: random.next()) }
            if random.chance(0.5), bytes.count >= 16 {
                // A plausible header, so bodies get reached: small size, known opcode, valid flags.
                let opcode = Opcode.allCases[Int(random.next() % UInt64(Opcode.allCases.count))].rawValue
                let head = header(bodyBytes: UInt32(random.next() % 80), opcode: opcode, flags: UInt16(random.next() % 4),
                                  status: random.chance(0.8) ? 0 : UInt32(random.next() % 13))
                bytes.replaceSubrange(0..<16, with: head)
            }
            decoded += try feed(bytes, seed: seed)
            decoded += try feedBodies(bytes, seed: seed)
        }
        print("FuzzTests.randomBytes: \(decoded) inputs decoded")
    }

    @Test func mutatedValidFrames() throws {
        let seed = testSeed("FuzzTests.mutatedValidFrames")
        var random = SplitMix64(seed: seed)
        var generator = MessageGenerator(seed: seed ^ 0x5EED, maxList: 6)
        var corpus: [[UInt8]] = []
        for opcode in Opcode.allCases {
            for _ in 0..<8 {
                corpus.append(try generator.request(opcode).encodeFrame(requestID: generator.u32()))
                corpus.append(try generator.reply(opcode).encodeFrame(requestID: generator.u32()))
            }
        }
        var decoded = 0
        for _ in 0..<Self.mutatedInputs {
            var bytes = corpus[Int(random.next() % UInt64(corpus.count))]
            for _ in 0...Int(random.next() % 3) { mutate(&bytes, &random) }
            decoded += try feed(bytes, seed: seed)
            decoded += try feedBodies(Array(bytes.dropFirst(min(16, bytes.count))), seed: seed)
        }
        print("FuzzTests.mutatedValidFrames: \(decoded) inputs decoded")
    }

    /// One mutation: bit flips, truncation, insertion, deletion, or an interesting u32 (a count
    /// or length at, over or far over a limit) written over any offset.
    private func mutate(_ bytes: inout [UInt8], _ random: inout SplitMix64) {
        func position(_ extra: Int = 0) -> Int { Int(random.next() % UInt64(bytes.count + extra)) }
        guard !bytes.isEmpty else { bytes = [UInt8(truncatingIfNeeded: random.next())]; return }
        switch random.next() % 6 {
        case 0:
            for _ in 0...Int(random.next() % 4) { bytes[position()] ^= 1 << (random.next() % 8) }
        case 1:
            bytes.removeLast(Int(random.next() % UInt64(bytes.count)) + 1)
        case 2:
            let inserted = (0..<Int(random.next() % 9) + 1).map { _ in UInt8(truncatingIfNeeded: random.next()) }
            bytes.insert(contentsOf: inserted, at: position(1))
        case 3:
            let start = position()
            bytes.removeSubrange(start..<min(bytes.count, start + Int(random.next() % 8) + 1))
        default:
            let interesting: [UInt32] = [0, 1, 0xFFFF, 0xFFFF_FFFF, 0x8000_0000, 1024, 1025, 4096, 4097, 262_144, 262_145,
                                         UInt32(ProtocolLimits.maxControlBody), UInt32(ProtocolLimits.maxControlBody + 1)]
            let value = interesting[Int(random.next() % UInt64(interesting.count))]
            let at = position()
            withUnsafeBytes(of: value.littleEndian) { raw in
                for i in 0..<min(4, bytes.count - at) { bytes[at + i] = raw[i] }
            }
        }
    }

    /// Feeds `bytes` to a frame decoder in random-sized pieces; decodes each frame it yields.
    /// Returns how many messages decoded.
    private func feed(_ bytes: [UInt8], seed: UInt64) throws -> Int {
        var decoder = FrameDecoder()
        var decoded = 0
        var offset = 0
        var split = SplitMix64(seed: UInt64(bytes.count) &* 0x9E37_79B9 ^ seed)
        while offset < bytes.count {
            let end = min(bytes.count, offset + 1 + Int(split.next() % 40))
            bytes[offset..<end].withUnsafeBytes { decoder.append($0) }
            offset = end
            while true {
                let frame: Frame?
                do { frame = try decoder.nextFrame() } catch { return decoded }
                guard let frame else { break }
                #expect(frame.body.count <= ProtocolLimits.maxInlineBody)
                if frame.header.isReply {
                    for inline in [false, true] {
                        guard let reply = try? Reply.decode(frame, getInline: inline) else { continue }
                        #expect(try reply.encodeFrame(requestID: frame.header.requestID) == frame.bytes, "seed \(seed)")
                        decoded += 1
                    }
                } else if let request = try? Request.decode(frame) {
                    #expect(try request.encodeFrame(requestID: frame.header.requestID) == frame.bytes, "seed \(seed)")
                    decoded += 1
                }
            }
        }
        return decoded
    }

    /// Feeds `body` to every body decoder, request and reply. Decoders get the raw buffer
    /// directly, so each rejection throws once (swift-testing records a backtrace per throw).
    private func feedBodies(_ body: [UInt8], seed: UInt64) throws -> Int {
        var decoded: [(String, [UInt8])] = []
        body.withUnsafeBytes { raw in
            for opcode in Opcode.allCases {
                do throws(ProtocolError) {
                    var writer = ByteWriter()
                    try Request.decodeBody(opcode: opcode, raw).encodeBody(into: &writer)
                    decoded.append(("\(opcode) request", writer.bytes))
                } catch {}
                for inline in opcode == .get ? [false, true] : [false] {
                    do throws(ProtocolError) {
                        var writer = ByteWriter()
                        try Reply.decodeBody(opcode: opcode, raw, getInline: inline).encodeBody(into: &writer)
                        decoded.append(("\(opcode) reply", writer.bytes))
                    } catch {}
                }
            }
            do throws(ProtocolError) {
                var writer = ByteWriter()
                try ErrorReply(status: 1, decoding: raw).encode(into: &writer)
                decoded.append(("error reply", writer.bytes))
            } catch {}
        }
        for (what, reencoded) in decoded { #expect(reencoded == body, "\(what), seed \(seed)") }
        return decoded.count
    }
}
