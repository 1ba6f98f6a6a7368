import KVTierCore
@testable import KVTierProtocol
import Testing

/// The VRAM tier's messages (protocol version 2): their bytes exactly as docs/protocol.md lists
/// them (what the Python client writes and reads), and every bound of `VRAM_POOL` checked by the
/// encoder and by the decoder, from the length alone where a length is over its limit.
@Suite struct VramMessageTests {
    static let handle: [UInt8] = [0x7B, 0x22, 0x7D]  // `{"}`, opaque to the daemon

    /// A `VRAM_POOL` body written field by field.
    static func poolBody(uuid: [UInt8] = Array("GPU-1".utf8), slots: UInt32 = 3, slotBytes: UInt64 = 4096,
                         handleLength: Int? = nil, handle: [UInt8] = handle) -> [UInt8] {
        body { w in
            w.u16(UInt16(uuid.count)); w.raw(uuid)
            w.u32(slots); w.u64(slotBytes)
            w.u16(UInt16(handleLength ?? handle.count)); w.raw(handle)
        }
    }

    @Test func eachMessageHasTheDocumentedBytes() throws {
        let pool = VramPool(deviceUUID: "GPU-1", slots: 3, slotBytes: 4096, handle: Self.handle)
        #expect(try pool.encodedBody() == [5, 0] + Array("GPU-1".utf8) + [3, 0, 0, 0] + [0, 0x10, 0, 0, 0, 0, 0, 0] + [3, 0] + Self.handle)
        #expect(try VramPool(decoding: Self.poolBody()) == pool)
        #expect(try VramPoolReply(poolID: 9).encodedBody() == [9, 0, 0, 0])

        let place = VramPlace(modelID: 0x0102, poolID: 7, tokens: [5, 6])
        let placeBytes = body { w in w.u64(0x0102); w.u32(7); w.u32(2); w.u32(5); w.u32(6) }
        #expect(try place.encodedBody() == placeBytes)
        #expect(try VramPlace(decoding: placeBytes) == place)

        let placed = VramPlaceReply(leaseID: 1 << 62, residentTokens: 16, pages: [VramPlacedPage(pageIndex: 1, tokens: 16, slot: 2),
                                                                                   VramPlacedPage(pageIndex: 2, tokens: 8, slot: 0)])
        let placedBytes = body { w in w.u64(1 << 62); w.u32(16); w.u32(2); w.u32(1); w.u32(16); w.u32(2); w.u32(2); w.u32(8); w.u32(0) }
        #expect(try placed.encodedBody() == placedBytes)
        #expect(try VramPlaceReply(decoding: placedBytes) == placed)
        #expect(try VramPlaceReply(decoding: body { w in w.u64(0); w.u32(40); w.u32(0) }) == VramPlaceReply(leaseID: 0, residentTokens: 40, pages: []))

        #expect(try VramCommit(leaseID: 0x0A0B).encodedBody() == body { $0.u64(0x0A0B) })
        #expect(try VramCommit(decoding: body { $0.u64(0x0A0B) }).leaseID == 0x0A0B)
        #expect(try VramDrop(poolID: 9).encodedBody() == body { $0.u32(9) })
        #expect(try VramDrop(decoding: body { $0.u32(9) }).poolID == 9)
        #expect(try VramDropReply(readers: 2).encodedBody() == body { $0.u32(2) })
        #expect(try VramDropReply(decoding: body { $0.u32(2) }).readers == 2)

        let lease = VramLease(modelID: 3, tokens: [1])
        #expect(try lease.encodedBody() == body { w in w.u64(3); w.u32(1); w.u32(1) })
        let lent = VramLeaseReply(poolID: 7, deviceUUID: "GPU-1", slots: 3, slotBytes: 4096, handle: Self.handle, leaseID: (1 << 62) + 1,
                                  tokens: 24, pages: [VramLeasedPage(tokens: 16, slot: 2), VramLeasedPage(tokens: 8, slot: 0)])
        let lentBytes = body { w in
            w.u32(7); w.u16(5); w.raw("GPU-1".utf8); w.u32(3); w.u64(4096); w.u16(3); w.raw(Self.handle)
            w.u64((1 << 62) + 1); w.u32(24); w.u32(2); w.u32(16); w.u32(2); w.u32(8); w.u32(0)
        }
        #expect(try lent.encodedBody() == lentBytes)
        #expect(try VramLeaseReply(decoding: lentBytes) == lent)
        let none = body { w in w.u32(0); w.u16(0); w.u32(0); w.u64(0); w.u16(0); w.u64(0); w.u32(0); w.u32(0) }
        #expect(try VramLeaseReply.none.encodedBody() == none)
        #expect(try VramLeaseReply(decoding: none) == .none)

        // LOOKUP's reply ends in vramTokens.
        let lookup = LookupReply(cachedTokens: 40, ramTokens: 24, diskTokens: 16, estimatedLoadMicros: 0x0102, vramTokens: 32)
        let lookupBytes = body { w in w.u32(40); w.u32(24); w.u32(16); w.u64(0x0102); w.u32(32) }
        #expect(try lookup.encodedBody() == lookupBytes)
        #expect(try LookupReply(decoding: lookupBytes) == lookup)
        expectError(.malformed, "a version 1 LOOKUP reply") { () throws(ProtocolError) in _ = try LookupReply(decoding: Array(lookupBytes.dropLast(4))) }
    }

    @Test func frameRoundTripsKeepTheOpcodes() throws {
        let pool = Request.vramPool(VramPool(deviceUUID: "GPU-1", slots: 1, slotBytes: 1, handle: [0]))
        let frame = try decodeOneFrame(pool.encodeFrame(requestID: 4))
        #expect(frame.header.opcode == 0x0060)
        #expect(try Request.decode(frame) == pool)
        #expect(Request.vramPlace(VramPlace(modelID: 1, poolID: 1, tokens: [])).opcode.rawValue == 0x0061)
        #expect(Request.vramCommit(VramCommit(leaseID: 1)).opcode.rawValue == 0x0062)
        #expect(Request.vramLease(VramLease(modelID: 1, tokens: [])).opcode.rawValue == 0x0063)
        #expect(Request.vramDrop(VramDrop(poolID: 1)).opcode.rawValue == 0x0064 && Opcode.vramDrop.description == "VRAM_DROP")
        let commit = try decodeOneFrame(Reply.vramCommit.encodeFrame(requestID: 5))
        #expect(commit.body.isEmpty && commit.header.opcode == 0x0062)
        #expect(try Reply.decode(commit) == .vramCommit)
        #expect(Opcode.vramPool.description == "VRAM_POOL" && Opcode.vramLease.description == "VRAM_LEASE")
    }

    @Test func poolFieldsOutOfTheirBoundsAreRefusedByBothSides() {
        let uuid65 = [UInt8](repeating: 0x41, count: ProtocolLimits.maxDeviceUUIDBytes + 1)
        let cases: [(String, WireError, [UInt8])] = [
            ("empty UUID", .malformed, Self.poolBody(uuid: [])),
            ("65-byte UUID", .tooLarge, Self.poolBody(uuid: uuid65)),
            ("zero slots", .malformed, Self.poolBody(slots: 0)),
            ("65 537 slots", .tooLarge, Self.poolBody(slots: UInt32(ProtocolLimits.maxVramSlots + 1))),
            ("zero slotBytes", .malformed, Self.poolBody(slotBytes: 0)),
            ("slots of 2^30 + 1 bytes", .tooLarge, Self.poolBody(slotBytes: ProtocolLimits.maxVramSlotBytes + 1)),
            ("empty handle", .malformed, Self.poolBody(handle: [])),
            ("1025-byte handle", .tooLarge, Self.poolBody(handle: [UInt8](repeating: 1, count: ProtocolLimits.maxVramHandleBytes + 1))),
            // Refused from the length alone: the bytes it announces never came.
            ("handle length 60 000, 3 bytes", .tooLarge, Self.poolBody(handleLength: 60_000)),
            ("handle length 4, 3 bytes", .malformed, Self.poolBody(handleLength: 4)),
            ("a trailing byte", .malformed, Self.poolBody() + [0]),
            ("cut inside slotBytes", .malformed, Array(Self.poolBody().prefix(2 + 5 + 4 + 3))),
        ]
        for (name, code, bytes) in cases {
            expectError(code, "VRAM_POOL with \(name)") { () throws(ProtocolError) in _ = try VramPool(decoding: bytes) }
            expectError(code, "VRAM_POOL with \(name), as a frame") { () throws(ProtocolError) in
                _ = try withRawBytes(bytes) { (raw) throws(ProtocolError) in try Request.decodeBody(opcode: .vramPool, raw) }
            }
        }
        // The limits themselves pass.
        let largest = Self.poolBody(uuid: [UInt8](repeating: 0x41, count: ProtocolLimits.maxDeviceUUIDBytes),
                                    slots: UInt32(ProtocolLimits.maxVramSlots), slotBytes: ProtocolLimits.maxVramSlotBytes,
                                    handle: [UInt8](repeating: 9, count: ProtocolLimits.maxVramHandleBytes))
        #expect((try? VramPool(decoding: largest))?.handle.count == ProtocolLimits.maxVramHandleBytes)
        // The encoder refuses what the decoder would.
        let unsendable: [(String, WireError, VramPool)] = [
            ("empty UUID", .malformed, VramPool(deviceUUID: "", slots: 1, slotBytes: 1, handle: [1])),
            ("65-byte UUID", .tooLarge, VramPool(deviceUUID: String(repeating: "a", count: 65), slots: 1, slotBytes: 1, handle: [1])),
            ("zero slots", .malformed, VramPool(deviceUUID: "g", slots: 0, slotBytes: 1, handle: [1])),
            ("zero slotBytes", .malformed, VramPool(deviceUUID: "g", slots: 1, slotBytes: 0, handle: [1])),
            ("empty handle", .malformed, VramPool(deviceUUID: "g", slots: 1, slotBytes: 1, handle: [])),
            ("1025-byte handle", .tooLarge, VramPool(deviceUUID: "g", slots: 1, slotBytes: 1, handle: [UInt8](repeating: 0, count: 1025))),
        ]
        for (name, code, pool) in unsendable {
            expectError(code, "encoding VRAM_POOL with \(name)") { () throws(ProtocolError) in _ = try pool.encodedBody() }
        }
    }

    @Test func otherBodiesRefuseTrailingBytesTruncationAndHugeCounts() {
        let place = body { w in w.u64(1); w.u32(7); w.u32(1); w.u32(5) }
        expectError(.malformed) { () throws(ProtocolError) in _ = try VramPlace(decoding: place + [0]) }
        expectError(.malformed) { () throws(ProtocolError) in _ = try VramPlace(decoding: Array(place.dropLast())) }
        expectError(.malformed) { () throws(ProtocolError) in _ = try VramCommit(decoding: body { $0.u64(1) } + [0]) }
        expectError(.malformed) { () throws(ProtocolError) in _ = try VramCommit(decoding: [1, 2, 3]) }
        expectError(.malformed) { () throws(ProtocolError) in _ = try VramDrop(decoding: body { $0.u32(1) } + [0]) }
        expectError(.malformed) { () throws(ProtocolError) in _ = try VramDropReply(decoding: [1, 0]) }
        expectError(.malformed) { () throws(ProtocolError) in _ = try VramLease(decoding: body { w in w.u64(1); w.u32(0) } + [0]) }
        expectError(.malformed) { () throws(ProtocolError) in _ = try VramPoolReply(decoding: [1, 0, 0, 0, 0]) }
        expectError(.malformed) { () throws(ProtocolError) in
            _ = try withRawBytes([0]) { (raw) throws(ProtocolError) in try Reply.decodeBody(opcode: .vramCommit, raw, getInline: false) }
        }
        // Reply lists: over maxVramSlots from the count alone, and counts the body cannot hold.
        let over = UInt32(ProtocolLimits.maxVramSlots + 1)
        expectError(.tooLarge) { () throws(ProtocolError) in _ = try VramPlaceReply(decoding: body { w in w.u64(1); w.u32(0); w.u32(over) }) }
        expectError(.malformed) { () throws(ProtocolError) in _ = try VramPlaceReply(decoding: body { w in w.u64(1); w.u32(0); w.u32(2); w.u32(0) }) }
        let leaseHead = body { w in w.u32(1); w.u16(1); w.raw([0x67]); w.u32(4); w.u64(4096) }
        expectError(.tooLarge) { () throws(ProtocolError) in
            _ = try VramLeaseReply(decoding: leaseHead + body { w in w.u16(UInt16(ProtocolLimits.maxVramHandleBytes + 1)) })
        }
        expectError(.tooLarge) { () throws(ProtocolError) in
            _ = try VramLeaseReply(decoding: leaseHead + body { w in w.u16(1); w.u8(0); w.u64(1); w.u32(16); w.u32(over) })
        }
        expectError(.malformed) { () throws(ProtocolError) in
            _ = try VramLeaseReply(decoding: leaseHead + body { w in w.u16(1); w.u8(0); w.u64(1); w.u32(16); w.u32(1); w.u32(16) })
        }
    }
}
