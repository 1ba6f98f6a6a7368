import KVTierCodec
import KVTierCore
import KVTierDaemon
import KVTierIO
import KVTierProtocol
import KVTierServer
import KVTierStore
import KVTierStoreTesting
import KVTierTools
import Logging
import Testing

/// A model's own disk codec (`REGISTER_MODEL`'s `diskCodec`): its pages go to disk with it
/// whatever the daemon's `diskCodec` is, it is part of the model id, and it survives a restart.
@Suite struct ModelDiskCodecTests {
    typealias Store = TieredStoreTests
    static let alice = Store.alice
    static let pageTokens = 16

    /// A store like kvtierd's over `storage` (disk tier and catalog there), with the daemon's
    /// default disk codec, lossy `k4v4`.
    static func open(_ storage: SimulatedStorage) throws -> (TieredStore, DiskTier, StoreRequestHandler) {
        let disk = try DiskTier(storage: storage, logger: Store.logger)
        let catalog = try SessionCatalog(storage: storage, logger: Store.logger)
        var configuration = TieredStore.Configuration()
        configuration.ramBudgetBytes = 64 << 20
        configuration.arenaBytes = 256 << 20
        configuration.minResidenceMicros = 0
        #expect(configuration.diskCodec == Codec(.k4v4), "the default this suite overrides")
        let store = TieredStore(configuration: configuration, disk: disk, catalog: catalog, logger: Store.logger) { tenant in
            try ArenaPageMemory(name: "kvtier-model-codec-test-\(tenant)", capacity: 256 << 20, stagingCapacity: 64 << 20, logger: Store.logger)
        }
        return (store, disk, StoreRequestHandler(store: store, defaultPageTokens: pageTokens))
    }

    static func request(_ name: String = "codec-test", headDim: UInt16 = 32, diskCodec: String?) -> RegisterModel {
        RegisterModel(name: name, layers: 2, kvHeads: 2, headDim: headDim, elementType: .float16, pageTokens: 0, ropeTheta: 10_000,
                      diskCodec: diskCodec)
    }

    /// Registers through the daemon's request handler, as a client would.
    static func register(_ handler: StoreRequestHandler, _ request: RegisterModel) async throws -> UInt64 {
        let reply = await handler.handleToEnd(.registerModel(request), context: StoreRequestPathTests.context(1))
        guard case .registerModel(let registered) = reply else { throw TestFailure("REGISTER_MODEL answered \(reply)") }
        #expect(Int(registered.pageTokens) == pageTokens)
        return registered.modelID
    }

    static func errorReply(_ handler: StoreRequestHandler, _ request: RegisterModel) async -> ErrorReply? {
        if case .error(_, let error) = await handler.handleToEnd(.registerModel(request), context: StoreRequestPathTests.context(1)) { return error }
        return nil
    }

    /// Random finite float16 KV (every quantizer accepts it, none but fp16 keeps it exactly),
    /// cut into page chunks.
    static func chunks(_ model: ModelSpec, tokens: Int, seed: UInt64) -> (chunks: [TieredStore.PutChunk], bytes: [UInt8]) {
        var chunks: [TieredStore.PutChunk] = []
        var bytes: [UInt8] = []
        for (index, start) in stride(from: 0, to: tokens, by: model.pageTokens).enumerated() {
            let count = min(model.pageTokens, tokens - start)
            let page = TestPattern.finiteFloat16(bytes: count * model.bytesPerToken, seed: seed &+ UInt64(index))
            chunks.append(.bytes(page))
            bytes += page.copyBytes()
        }
        return (chunks, bytes)
    }

    /// The bytes of `tokens` as `get` serves them now.
    static func read(_ store: TieredStore, _ model: ModelSpec, _ tokens: [UInt32]) async throws -> [UInt8] {
        let got = try await store.get(alice, owner: 1, modelID: model.id, tokens: tokens, maxTokens: 0)
        #expect(got.tokens == tokens.count)
        let memory = try store.memory(for: alice)
        var bytes: [UInt8] = []
        for page in got.pages { bytes += memory.buffer(page.extent).copyBytes().prefix(page.tokens * model.bytesPerToken) }
        try store.release(alice, leaseID: got.leaseID)
        return bytes
    }

    /// Byte equality without printing a page's bytes when it fails.
    static func same(_ a: [UInt8], _ b: [UInt8]) -> Bool { a == b }

    /// Every page of the model is on disk only, written with `codec`.
    static func expectOnDiskOnly(_ store: TieredStore, _ model: ModelSpec, pages: Int, codec: Codec,
                                 sourceLocation: SourceLocation = #_sourceLocation) {
        let summaries = store.pageSummaries(alice, modelID: model.id)
        #expect(summaries.count == pages, sourceLocation: sourceLocation)
        for page in summaries {
            #expect(!page.inRAM && page.onDisk, sourceLocation: sourceLocation)
            #expect(page.diskCodec == codec, "written with \(page.diskCodec.map(\.name) ?? "nothing"), not \(codec)",
                    sourceLocation: sourceLocation)
        }
    }

    @Test func anFP16ModelIsStoredBitExactWhileTheDefaultIsK4V4() async throws {
        let storage = SimulatedStorage(seed: 41)
        let tokens: [UInt32] = (0..<40).map { UInt32($0 * 13 % 509) }  // 3 pages: 16, 16, 8
        let (lossless, lossy): (ModelSpec, ModelSpec)
        let (losslessBytes, lossyBytes): ([UInt8], [UInt8])
        do {
            let (store, disk, handler) = try Self.open(storage)
            let losslessID = try await Self.register(handler, Self.request(diskCodec: "fp16"))
            let lossyID = try await Self.register(handler, Self.request(diskCodec: ""))
            #expect(losslessID != lossyID, "the same shape with a codec is another model")
            lossless = try store.model(losslessID)
            lossy = try store.model(lossyID)
            #expect(lossless.diskCodec == Codec(.fp16) && lossy.diskCodec == nil)

            // The same KV into both models, then out of RAM: each page is written to disk.
            let data = Self.chunks(lossless, tokens: tokens.count, seed: 7)
            for model in [lossless, lossy] {
                let put = try await store.put(Self.alice, owner: 1, modelID: model.id, tokens: tokens, dataStart: 0, chunks: data.chunks, durable: false)
                #expect(put.cachedTokens == 40 && put.newPages == 3)
            }
            let evicted = try await store.evict(Self.alice, modelID: nil, tokens: nil, deleteFromDisk: false)
            #expect(evicted.evicted == 6 && evicted.skipped == 0)
            Self.expectOnDiskOnly(store, lossless, pages: 3, codec: Codec(.fp16))
            Self.expectOnDiskOnly(store, lossy, pages: 3, codec: Codec(.k4v4))

            losslessBytes = try await Self.read(store, lossless, tokens)
            lossyBytes = try await Self.read(store, lossy, tokens)
            #expect(Self.same(losslessBytes, data.bytes), "fp16 pages come back from disk bit for bit")
            #expect(lossyBytes.count == data.bytes.count && !Self.same(lossyBytes, data.bytes), "k4v4 quantized them (this test could not tell otherwise)")
            await disk.close()
        }

        // After a restart the catalog knows the model's codec: pages written now (no
        // REGISTER_MODEL since) use it, and the pages from before still read back exactly.
        let (store, disk, handler) = try Self.open(storage)
        #expect(try store.model(lossless.id) == lossless)
        #expect(try store.model(lossy.id) == lossy)
        let more: [UInt32] = (0..<20).map { UInt32(1000 + $0) }
        let data = Self.chunks(lossless, tokens: more.count, seed: 99)
        _ = try await store.put(Self.alice, owner: 1, modelID: lossless.id, tokens: more, dataStart: 0, chunks: data.chunks, durable: false)
        _ = try await store.evict(Self.alice, modelID: lossless.id, tokens: nil, deleteFromDisk: false)
        Self.expectOnDiskOnly(store, lossless, pages: 5, codec: Codec(.fp16))
        #expect(Self.same(try await Self.read(store, lossless, more), data.bytes))
        #expect(Self.same(try await Self.read(store, lossless, tokens), losslessBytes))
        // Registering again gives the same id, and the registration lists its codec.
        #expect(try await Self.register(handler, Self.request(diskCodec: "fp16")) == lossless.id)
        let listed = await handler.handleToEnd(.models(ListPage()), context: StoreRequestPathTests.context(1))
        guard case .models(let models) = listed else { throw TestFailure("MODELS answered \(listed)") }
        #expect(models.models.map(\.registration.diskCodec) == ["fp16"])
        await disk.close()
    }

    @Test func theIdHashesTheCanonicalNameAndBadNamesAreRefused() async throws {
        let (store, disk, handler) = try Self.open(SimulatedStorage(seed: 42))
        let plain = try await Self.register(handler, Self.request(diskCodec: nil))
        #expect(plain == (try Self.request(diskCodec: nil).modelID(pageTokensInForce: 16)), "no codec: the id of before")
        #expect(try await Self.register(handler, Self.request(diskCodec: "")) == plain, "an empty name is no codec")

        let zstd = try await Self.register(handler, Self.request(diskCodec: "fp16+zstd"))
        for spelling in ["fp16+zstd(1)", "FP16+ZSTD", "fp16+zstd1", "fp16+zstd-1"] {
            #expect(try await Self.register(handler, Self.request(diskCodec: spelling)) == zstd, "\(spelling)")
        }
        #expect(zstd == (try Self.request(diskCodec: "fp16+zstd").modelID(pageTokensInForce: 16)))
        #expect(try store.model(zstd).diskCodec == Codec(.fp16, .zstd(level: 1)))
        let level3 = try await Self.register(handler, Self.request(diskCodec: "tq3m+zstd(3)"))
        #expect(level3 == (try Self.request(diskCodec: "tq3m+zstd(3)").modelID(pageTokensInForce: 16)))
        #expect(Set([plain, zstd, level3, try await Self.register(handler, Self.request(diskCodec: "k4v4"))]).count == 4,
                "naming the default codec is still another model: the default may change, the model's codec does not")

        for bad in ["fp32", "k4v4+gzip", "fp16+", "+lz4", "fp16+zstd(20)", " fp16"] {
            let error = await Self.errorReply(handler, Self.request(diskCodec: bad))
            #expect(error?.status == WireError.invalidArgument.rawValue, "\(bad)")
            #expect(error?.message.contains("fp16, fp16+lz4, fp16+zstd") == true, "the reply lists the valid names: \(error?.message ?? "")")
        }
        // A codec that cannot encode the model's head dimension is refused at registration.
        let shape = await Self.errorReply(handler, Self.request("odd-heads", headDim: 48, diskCodec: "k4v4"))
        #expect(shape?.status == WireError.invalidArgument.rawValue && shape?.message.contains("head dim") == true, "\(String(describing: shape))")
        #expect(try await Self.register(handler, Self.request("odd-heads", headDim: 48, diskCodec: "q8")) != 0)
        await disk.close()
    }

    /// NaN and Inf still fall back to fp16 under a model's quantizing codec: every bit kept.
    @Test func nonFinitePagesOfAQuantizedModelAreStoredAsFP16() async throws {
        let (store, disk, handler) = try Self.open(SimulatedStorage(seed: 43))
        let model = try store.model(try await Self.register(handler, Self.request(diskCodec: "tq3m+zstd(3)")))
        let tokens: [UInt32] = Array(0..<16)
        let page = TestPattern.finiteFloat16(bytes: 16 * model.bytesPerToken, seed: 5)
        page.bytes.storeBytes(of: UInt16(0x7E00).littleEndian, toByteOffset: 2 * 17, as: UInt16.self)  // a NaN
        let expected = page.copyBytes()
        _ = try await store.put(Self.alice, owner: 1, modelID: model.id, tokens: tokens, dataStart: 0, chunks: [.bytes(page)], durable: false)
        _ = try await store.evict(Self.alice, modelID: model.id, tokens: nil, deleteFromDisk: false)
        Self.expectOnDiskOnly(store, model, pages: 1, codec: Codec(.fp16, .zstd(level: 3)))
        #expect(Self.same(try await Self.read(store, model, tokens), expected))
        await disk.close()
    }
}
