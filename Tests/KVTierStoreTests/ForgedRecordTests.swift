import KVTierCodec
import KVTierCore
import KVTierStore
import KVTierStoreTesting
import KVTierTools
import Testing

/// Finding 2 of the hardening issue: a tenant stores a page whose bytes hold complete, validly
/// checksummed records naming another tenant's page; a torn write of that page must never make
/// recovery accept the records inside it.
@Suite struct ForgedRecordTests {
    static let victim = PageAddress(tenant: TenantID(1000), key: PageKey(high: 0xBEEF, low: 1))
    static let attacker = PageAddress(tenant: TenantID(2000), key: PageKey(high: 0xBAD, low: 2))
    /// The attacker's page: large enough to carry records at block boundaries inside it.
    static let bigShape = PageShape(tokens: 256, layers: 2, kvHeads: 2, headDim: 64)
    static let huge: UInt64 = 1 << 60

    /// A complete record naming the victim, built as a client could: the format is public, so
    /// every field and the CRC-32C are the client's to choose (record version `version`, any
    /// trailing authentication bytes guessed as `guess`).
    static func forgedRecord(version: UInt16, guess: UInt64) throws -> [UInt8] {
        let bytes = TestPattern.finiteFloat16(bytes: TestPage.shape.rawBytes, seed: 666)
        var record = try withExtendedLifetime(bytes) {
            try PageRecord.encode(address: victim, modelID: 7, codec: Codec(.fp16), shape: TestPage.shape,
                                  data: bytes.readOnly, createdMicros: 1)
        }
        withUnsafeBytes(of: version.littleEndian) { for i in 0..<2 { record[4 + i] = $0[i] } }
        withUnsafeBytes(of: huge.littleEndian) { for i in 0..<8 { record[16 + i] = $0[i] } }
        withUnsafeBytes(of: guess.littleEndian) { for i in 0..<8 { record[88 + i] = $0[i] } }
        let recordBytes = Int(UInt32(record[8]) | UInt32(record[9]) << 8 | UInt32(record[10]) << 16 | UInt32(record[11]) << 24)
        if version == 1 {
            // Version 1 keeps the payload length at 68.
            let payload = UInt32(recordBytes - RecordHeader.size - 4 * TestPage.shape.layers)
            withUnsafeBytes(of: payload.littleEndian) { for i in 0..<4 { record[68 + i] = $0[i] } }
        }
        for i in 12..<16 { record[i] = 0 }
        let crc = CRC32C.checksum(Array(record[0..<recordBytes]))
        withUnsafeBytes(of: crc.littleEndian) { for i in 0..<4 { record[12 + i] = $0[i] } }
        return record
    }

    /// Page data whose fp16 record carries `embedded` at block boundaries (record offsets 16384·k).
    static func attackData(_ embedded: [[UInt8]]) throws -> PageBuffer {
        let data = PageBuffer(byteCount: bigShape.rawBytes)
        data.bytes.initializeMemory(as: UInt8.self, repeating: 0)
        let payloadStart = RecordHeader.size + 4 * bigShape.layers
        for (k, record) in embedded.enumerated() {
            let at = (k + 1) * 4 * Block.size - payloadStart
            for (i, byte) in record.enumerated() { data.bytes[at + i] = byte }
        }
        // The precondition of the attack: the raw fp16 codec stores those bytes unchanged.
        let encoded = try withExtendedLifetime(data) {
            try PageRecord.encode(address: attacker, modelID: 7, codec: Codec(.fp16), shape: bigShape,
                                  data: data.readOnly, createdMicros: 1)
        }
        for (k, record) in embedded.enumerated() {
            let at = (k + 1) * 4 * Block.size
            #expect(Array(encoded[at..<at + record.count]) == record, "the codec must store the client's bytes as they are")
        }
        return data
    }

    @Test(arguments: [false, true])
    func recordsInsideATornPageAreNeverRecovered(realCrash: Bool) async throws {
        let storage = SimulatedStorage(seed: 0xF0F0)
        let tier = try DiskTier(storage: storage, logger: quietLogger)
        let victimData = TestPage(number: 1).data
        try await tier.write(Self.victim, modelID: 7, codec: Codec(.fp16), shape: TestPage.shape, data: victimData)
        let embedded = [try Self.forgedRecord(version: 1, guess: 0), try Self.forgedRecord(version: 2, guess: 0x0123_4567_89AB_CDEF)]
        let stored = try await tier.write(Self.attacker, modelID: 7, codec: Codec(.fp16), shape: Self.bigShape,
                                          data: try Self.attackData(embedded))
        await tier.close()

        // The crash tore the attacker's record: its last blocks never reached the disk, the
        // blocks carrying the embedded records did.
        let path = "store/\(SegmentHeader.fileName(stored.segment))"
        let file = try storage.open(path, .readWriteCreate)
        try file.truncate(to: stored.offset + (embedded.count + 1) * 4 * Block.size)
        try file.sync()
        if realCrash { storage.crash() }

        let recovered = try DiskTier(storage: storage, logger: quietLogger)
        guard case .success(let page) = await recovered.read(Self.victim) else {
            Issue.record("the victim's acknowledged page is gone")
            return
        }
        #expect(page.data.copyBytes() == victimData.copyBytes(), "the victim must read its own bytes, not the attacker's")
        #expect((recovered.page(Self.victim)?.sequence ?? 0) < Self.huge)
        #expect(!recovered.contains(Self.attacker), "the torn record was never acknowledged")
        #expect(recovered.pages().count == 1)
        // Sequence numbers must not have been pushed towards overflow by a forged record.
        let next = try await recovered.write(PageAddress(tenant: TenantID(3), key: PageKey(high: 3, low: 3)), modelID: 7,
                                             codec: Codec(.fp16), shape: TestPage.shape, data: TestPage(number: 3).data)
        #expect(next.sequence < Self.huge)
        await recovered.close()
    }

    /// A store written by version 1 (no record key): recovery must read it without any forward
    /// resync, so the same attack inside a torn version 1 record finds nothing, and must seal the
    /// segment so new records go into a version 2 one.
    @Test func aVersion1SegmentIsReadWithoutForwardResyncAndSealed() async throws {
        let storage = SimulatedStorage(seed: 0xF1F1)
        try storage.makeDirectory("store")
        let storeID = PageKey(high: 9, low: 9)
        let segment = try storage.open("store/\(SegmentHeader.fileName(1))", .readWriteCreate)
        try segment.write(SegmentHeader(segmentID: 1, storeID: storeID, createdMicros: 1, format: .legacy).encoded(), at: 0)
        // The victim's own record, as version 1 wrote it.
        let victimData = TestPage(number: 1).data
        var victim = try withExtendedLifetime(victimData) {
            try PageRecord.encode(address: Self.victim, modelID: 7, codec: Codec(.fp16), shape: TestPage.shape,
                                  data: victimData.readOnly, createdMicros: 1)
        }
        victim = try Self.asVersion1(victim, sequence: 1)
        try segment.write(victim, at: Block.size)
        // The attacker's record, torn, carrying a valid version 1 record naming the victim.
        let embedded = [try Self.forgedRecord(version: 1, guess: 0)]
        let attackData = try Self.attackData(embedded)
        var attack = try withExtendedLifetime(attackData) {
            try PageRecord.encode(address: Self.attacker, modelID: 7, codec: Codec(.fp16), shape: Self.bigShape,
                                  data: attackData.readOnly, createdMicros: 1)
        }
        attack = try Self.asVersion1(attack, sequence: 2)
        let attackAt = Block.size + victim.count
        try segment.write(Array(attack[0..<(embedded.count + 1) * 4 * Block.size]), at: attackAt)
        try segment.sync()
        let manifest = try storage.open("store/\(Manifest.fileName)", .readWriteCreate)
        try manifest.write(Manifest(epoch: 1, storeID: storeID, nextSegmentID: 2, segments: [.init(id: 1, state: .active)]).encoded(), at: 0)
        try manifest.sync()

        let recovered = try DiskTier(storage: storage, logger: quietLogger)
        guard case .success(let page) = await recovered.read(Self.victim) else {
            Issue.record("the victim's version 1 page is gone")
            return
        }
        #expect(page.data.copyBytes() == victimData.copyBytes())
        #expect(recovered.pages().count == 1)
        let next = try await recovered.write(PageAddress(tenant: TenantID(3), key: PageKey(high: 3, low: 3)), modelID: 7,
                                             codec: Codec(.fp16), shape: TestPage.shape, data: TestPage(number: 3).data)
        #expect(next.segment != 1, "new records go into a version 2 segment")
        #expect(next.sequence < Self.huge)
        await recovered.close()
    }

    /// `record` as the version 1 writer made it: version 1, payload length at 68, no tag, CRC.
    static func asVersion1(_ record: [UInt8], sequence: UInt64) throws -> [UInt8] {
        var copy = record
        let header = try copy.withUnsafeBytes { try RecordHeader(decoding: $0) }
        withUnsafeBytes(of: UInt16(1).littleEndian) { for i in 0..<2 { copy[4 + i] = $0[i] } }
        withUnsafeBytes(of: sequence.littleEndian) { for i in 0..<8 { copy[16 + i] = $0[i] } }
        withUnsafeBytes(of: UInt32(header.payloadBytes).littleEndian) { for i in 0..<4 { copy[68 + i] = $0[i] } }
        for i in 88..<96 { copy[i] = 0 }
        for i in 12..<16 { copy[i] = 0 }
        let crc = CRC32C.checksum(Array(copy[0..<header.recordBytes]))
        withUnsafeBytes(of: crc.littleEndian) { for i in 0..<4 { copy[12 + i] = $0[i] } }
        return copy
    }
}
