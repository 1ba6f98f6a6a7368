import KVTierCodec
import KVTierCore
import KVTierIO
import KVTierStore
import Logging
import Testing

@Suite struct PosixStorageSmokeTests {
    @Test func aDiskTierOnRealFilesRoundTrips() async throws {
        let temporary = try TemporaryDirectory("kvtier-posix")
        defer { temporary.remove() }
        let directory = temporary.path
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        let selection = try BlockReaders.make(logger: logger)
        defer { selection.reader.close() }
        let storage = PosixStorage(root: directory, reader: selection.reader, logger: logger)
        try storage.makeDirectory("")
        let shape = PageShape(tokens: 32, layers: 3, kvHeads: 2, headDim: 64)
        let data = PageBuffer(byteCount: shape.rawBytes)
        for i in 0..<data.count { data.bytes[i] = UInt8(truncatingIfNeeded: i &* 7 &+ i >> 8) }
        let address = PageAddress(tenant: TenantID(1), key: PageKey(high: 1, low: 2))
        let tier = try DiskTier(storage: storage, logger: logger)
        try await tier.write(address, modelID: 1, codec: Codec(.fp16, .zstd(level: 1)), shape: shape, data: data)
        guard case .success(let page) = await tier.read(address) else { Issue.record("page missing"); return }
        #expect(page.data.copyBytes() == data.copyBytes())
        await tier.close()
        let reopened = try DiskTier(storage: storage, logger: logger)
        guard case .success(let again) = await reopened.read(address) else { Issue.record("page missing after reopen"); return }
        #expect(again.data.copyBytes() == data.copyBytes())
    }
}
