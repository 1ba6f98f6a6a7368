import KVTierCodec
import KVTierCore
import KVTierStore
import KVTierTools
import Testing

/// The remote tier's values: sealed page records that open only as the page they were written
/// for, with the deployment's key, and whole.
@Suite struct RemoteRecordTests {
    static let model = ModelSpec(id: 0x77, name: "tiny", layers: 2, kvHeads: 2, headDim: 32, elementType: .float16, pageTokens: 16)
    static let address = PageAddress(tenant: TenantID(1000), key: PageKey(high: 1, low: 2))
    let key = DigestKey.random()

    static func record(codec: Codec = Codec(.fp16, .zstd(level: 1)), tokens: Int = model.pageTokens) throws -> (record: [UInt8], data: PageBuffer) {
        let shape = model.pageShape(tokens: tokens)
        let data = TestPattern.finiteFloat16(bytes: shape.rawBytes, seed: 5)
        return (try PageRecord.encode(address: address, modelID: model.id, codec: codec, shape: shape, data: data.readOnly, createdMicros: 9), data)
    }

    func open(_ value: [UInt8], key: DigestKey? = nil, address: PageAddress = address, model: ModelSpec = model) -> Result<[UInt8], RemoteRecord.Rejection> {
        let output = PageBuffer(byteCount: model.pageShape(tokens: model.pageTokens).rawBytes)
        return value.withUnsafeBytes { raw in
            Result { () throws(RemoteRecord.Rejection) in
                _ = try RemoteRecord.open(raw, key: key ?? self.key, address: address, model: model, into: output.bytes)
                return output.copyBytes()
            }
        }
    }

    @Test func sealedPagesOpenBitExact() throws {
        for codec in [Codec(.fp16), Codec(.fp16, .zstd(level: 1)), Codec(.k4v4)] {
            let (record, data) = try Self.record(codec: codec)
            let value = try #require(record.withUnsafeBytes { RemoteRecord.seal($0, key: key) })
            let header = try record.withUnsafeBytes { try RecordHeader(decoding: $0) }
            #expect(value.count == header.recordBytes + RemoteRecord.envelopeBytes, "the block padding stays behind")
            #expect(value.count <= RemoteRecord.maxValueBytes(Self.model))
            let opened = try open(value).get()
            if codec.quantizer == .fp16 { #expect(opened == data.copyBytes()) }
            // A disk copy of the same page (sealed by a segment, block padded) seals to the same value.
            let padded = record + [UInt8](repeating: 0, count: 4096 - record.count % 4096)
            #expect(padded.withUnsafeBytes { RemoteRecord.seal($0, key: key) } == value)
        }
    }

    @Test func everyAlteredByteIsRefused() throws {
        let value = try #require(try Self.record().record.withUnsafeBytes { RemoteRecord.seal($0, key: key) })
        var generator = SplitMix64(seed: 0xF11F)
        print("RemoteRecordTests seed 0xF11F")
        var offsets = Array(0..<RemoteRecord.envelopeBytes + RecordHeader.size)
        for _ in 0..<64 { offsets.append(Int(generator.next() % UInt64(value.count))) }
        for offset in offsets {
            var altered = value
            altered[offset] ^= UInt8(1 << (generator.next() % 8))
            guard case .failure = open(altered) else {
                Issue.record("byte \(offset) altered and still opened")
                continue
            }
        }
        #expect(throws: RemoteRecord.Rejection.self) { try open(Array(value.dropLast())).get() }
        #expect(throws: RemoteRecord.Rejection.self) { try open(value + [0]).get() }
        #expect(throws: RemoteRecord.Rejection.self) { try open([]).get() }
    }

    @Test func authenticValuesOpenOnlyAsTheirOwnPage() throws {
        let value = try #require(try Self.record().record.withUnsafeBytes { RemoteRecord.seal($0, key: key) })
        #expect(try open(value).get().count > 0)
        #expect(throws: RemoteRecord.Rejection.unauthenticated) { try open(value, key: DigestKey.random()).get() }
        let otherTenant = PageAddress(tenant: TenantID(1001), key: Self.address.key)
        let otherPage = PageAddress(tenant: Self.address.tenant, key: PageKey(high: 1, low: 3))
        for wrong in [otherTenant, otherPage] {
            guard case .failure(.mismatch) = open(value, address: wrong) else { Issue.record("opened as \(wrong)"); continue }
        }
        var otherModel = Self.model
        otherModel.id = 0x78
        guard case .failure(.mismatch) = open(value, model: otherModel) else { Issue.record("opened as another model"); return }
        // A partial page (a sequence's last) is not a whole page of the model.
        let partial = try #require(try Self.record(tokens: 5).record.withUnsafeBytes { RemoteRecord.seal($0, key: key) })
        guard case .failure(.mismatch) = open(partial) else { Issue.record("a partial page opened"); return }
    }
}
