import KVTierClient
import KVTierCore
import KVTierProtocol
import Testing

/// The client against a real kvtierd (skipped when none is built). The model is tiny: fp16,
/// 2 layers, 2 KV heads, head dim 32, 16-token pages, so a 40-token put is 2.5 pages.
@Suite(.serialized, .enabled(if: DaemonProcess.binary != nil, DaemonProcess.skipReason))
struct DaemonTests {
    static let spec = ModelSpecification(name: "client-test", layers: 2, kvHeads: 2, headDim: 32, elementType: .float16,
                                         pageTokens: 16, ropeTheta: 10_000)

    /// Random KV for `tokens` tokens, `[layers, tokens, kvHeads, headDim]` each.
    static func randomKV(tokens: Int, _ random: inout SplitMix64) -> (keys: [UInt16], values: [UInt16]) {
        let count = spec.shape.elements(tokens: tokens)
        return ((0..<count).map { _ in UInt16.random(in: 0...0x7BFF, using: &random) },
                (0..<count).map { _ in UInt16.random(in: 0...0x7BFF, using: &random) })
    }

    static func randomTokens(_ count: Int, _ random: inout SplitMix64) -> [UInt32] {
        (0..<count).map { _ in UInt32.random(in: 0..<128_000, using: &random) }
    }

    @Test func helloMapsTheArenaAndRegisters() async throws {
        let daemon = try await DaemonProcess.start()
        defer { daemon.stop() }
        let client = try await KVTierClient.connect(socketPath: daemon.socketPath, clientName: "client-tests")
        #expect(client.usesSharedMemory, "shared memory: \(client.sharedMemoryUnavailableReason ?? "offered")")
        #expect(client.protocolVersion == ProtocolVersion.current)
        try await client.ping()
        let model = try await client.registerModel(Self.spec)
        #expect(model.pageTokens == 16)
        let request = RegisterModel(name: "client-test", layers: 2, kvHeads: 2, headDim: 32, elementType: .float16, pageTokens: 16, ropeTheta: 10_000)
        #expect(model.modelID == (try request.modelID(pageTokensInForce: 16)))
        #expect(try await client.registerModel(Self.spec) == model, "registration is idempotent")
        let lookup = try await client.lookup(model, tokens: [1, 2, 3])
        #expect(lookup.cachedTokens == 0)
        await client.close()
        await #expect(throws: KVTierClientError.self) { try await client.ping() }
    }

    /// `ModelSpecification.diskCodec`: part of the id (hashed by its canonical name), listed by
    /// MODELS, used for the model's disk pages over the daemon's `k4v4`, and checked by the daemon.
    @Test func aModelsDiskCodecIsPartOfItsIdAndItsPagesCodec() async throws {
        var random = SplitMix64(seed: testSeed("DaemonTests.aModelsDiskCodecIsPartOfItsIdAndItsPagesCodec"))
        let daemon = try await DaemonProcess.start(arguments: ["--disk-codec", "k4v4"])
        defer { daemon.stop() }
        let client = try await KVTierClient.connect(socketPath: daemon.socketPath, clientName: "client-tests")
        var spec = Self.spec
        spec.diskCodec = "FP16+zstd(1)"
        let model = try await client.registerModel(spec)
        let request = RegisterModel(name: "client-test", layers: 2, kvHeads: 2, headDim: 32, elementType: .float16, pageTokens: 16,
                                    ropeTheta: 10_000, diskCodec: "fp16+zstd")
        #expect(model.modelID == (try request.modelID(pageTokensInForce: 16)), "the canonical name is hashed")
        #expect(model.modelID != (try await client.registerModel(Self.spec)).modelID)
        let listed = try await client.models().first { $0.modelID == model.modelID }
        #expect(listed?.registration.diskCodec == "fp16+zstd")

        let tokens = Self.randomTokens(40, &random)
        let kv = Self.randomKV(tokens: 40, &random)
        #expect(try await client.put(model, tokens: tokens, keys: kv.keys, values: kv.values) == 40)
        #expect(try await client.evictAll(modelID: model.modelID).evicted == 3)
        let pages = try await client.pages(modelID: model.modelID).pages
        #expect(pages.count == 3 && pages.allSatisfy { !$0.tiers.contains(.ram) && $0.codecTag == 0x0001_0201 },
                "fp16+zstd(1) is tag 0x10201: \(pages.map { String($0.codecTag, radix: 16) })")
        let got = try await client.get(model, tokens: tokens)
        #expect(got.keys == kv.keys && got.values == kv.values, "read back from disk bit for bit")

        spec.diskCodec = "fp32"
        do {
            _ = try await client.registerModel(spec)
            Issue.record("a codec name the daemon does not know was accepted")
        } catch let error as KVTierClientError {
            #expect(error.wireError == .invalidArgument && "\(error)".contains("fp16+lz4"), "\(error)")
        }
        await client.close()
    }

    /// The sub-3-bit codecs as the daemon's `diskCodec`: pages evicted to disk are stored with
    /// the codec's tag and served back decoded (each page's first token bit for bit, the rest
    /// within the codec's error), the same bytes on every read.
    @Test(arguments: [("tq3s", UInt32(7), 0.32), ("tq2s", UInt32(8), 0.40)])
    func subThreeBitDiskCodecsStoreAndServePages(codec: String, tag: UInt32, bound: Double) async throws {
        let seed = testSeed("DaemonTests.subThreeBitDiskCodecsStoreAndServePages(\(codec))")
        var random = SplitMix64(seed: seed)
        let daemon = try await DaemonProcess.start(arguments: ["--disk-codec", codec])
        defer { daemon.stop() }
        let client = try await KVTierClient.connect(socketPath: daemon.socketPath, clientName: "client-tests")
        let model = try await client.registerModel(Self.spec)
        let tokens = Self.randomTokens(40, &random)
        let count = Self.spec.shape.elements(tokens: 40)
        // KV-like data: values near N(0, 1), keys with a per-channel offset (what real keys have).
        let row = Self.spec.shape.rowElements
        let offsets = (0..<row).map { _ in 3 * random.nextGaussian() }
        let keys = (0..<count).map { ElementType.float16.bits(from: offsets[$0 % row] + random.nextGaussian()) }
        let values = (0..<count).map { _ in ElementType.float16.bits(from: random.nextGaussian()) }
        #expect(try await client.put(model, tokens: tokens, keys: keys, values: values) == 40)
        #expect(try await client.evictAll(modelID: model.modelID).evicted == 3)
        let pages = try await client.pages(modelID: model.modelID).pages
        #expect(pages.count == 3 && pages.allSatisfy { !$0.tiers.contains(.ram) && $0.codecTag == tag },
                "\(codec) is tag \(tag): \(pages.map { String($0.codecTag, radix: 16) })")
        let got = try await client.get(model, tokens: tokens)
        #expect(got.tokens == 40)
        func error(_ a: [UInt16], _ b: [UInt16]) -> Double {
            var difference = 0.0, norm = 0.0
            for (x, y) in zip(a, b) {
                let u = Double(ElementType.float16.float(fromBits: x)), v = Double(ElementType.float16.float(fromBits: y))
                difference += (u - v) * (u - v)
                norm += u * u
            }
            return (difference / norm).squareRoot()
        }
        let (keyError, valueError) = (error(keys, got.keys), error(values, got.values))
        #expect(keyError > 0 && keyError < bound && valueError > 0 && valueError < bound,
                "\(codec): K error \(keyError), V error \(valueError), seed \(seed)")
        // Token 0 of every page (0, 16, 32), in both layers, comes back bit for bit.
        for layer in 0..<2 {
            for token in [0, 16, 32] {
                let at = (layer * 40 + token) * row
                #expect(got.keys[at..<at + row] == keys[at..<at + row] && got.values[at..<at + row] == values[at..<at + row],
                        "\(codec): layer \(layer) token \(token) is a page's first token")
            }
        }
        let again = try await client.get(model, tokens: tokens)
        #expect(again.keys == got.keys && again.values == got.values, "a second read decodes the same bytes")
        await client.close()
    }

    /// Turn 1 stores 40 tokens; turn 2 extends to 70. Turn 2's keys and values for the cached
    /// 40 tokens are garbage: if the client sent any of them (say from the page start at 32),
    /// the GET would return garbage for tokens 32..<40.
    @Test(arguments: [true, false])
    func putLookupGetAndExtend(sharedMemory: Bool) async throws {
        let seed = testSeed("DaemonTests.putLookupGetAndExtend(sharedMemory: \(sharedMemory))")
        var random = SplitMix64(seed: seed)
        let daemon = try await DaemonProcess.start()
        defer { daemon.stop() }
        let client = try await KVTierClient.connect(socketPath: daemon.socketPath, mapSharedMemory: sharedMemory)
        #expect(client.usesSharedMemory == sharedMemory)
        let model = try await client.registerModel(Self.spec)

        let tokens = Self.randomTokens(70, &random)
        let turn1 = Self.randomKV(tokens: 40, &random)
        #expect(try await client.put(model, tokens: Array(tokens[0..<40]), keys: turn1.keys, values: turn1.values) == 40)
        let lookup = try await client.lookup(model, tokens: tokens)
        #expect(lookup.cachedTokens == 40 && lookup.ramTokens == 40 && lookup.diskTokens == 0)
        let got1 = try await client.get(model, tokens: Array(tokens[0..<40]))
        #expect(got1.tokens == 40)
        #expect(got1.keys == turn1.keys && got1.values == turn1.values, "seed \(seed)")

        var turn2 = Self.randomKV(tokens: 70, &random)  // tokens 0..<40 differ from turn 1's
        #expect(try await client.put(model, tokens: tokens, keys: turn2.keys, values: turn2.values) == 70)
        // What the daemon should hold: turn 1 for tokens 0..<40, turn 2 for 40..<70.
        let row = Self.spec.shape.rowElements
        for layer in 0..<2 {
            for token in 0..<40 {
                let to = (layer * 70 + token) * row, from = (layer * 40 + token) * row
                turn2.keys.replaceSubrange(to..<to + row, with: turn1.keys[from..<from + row])
                turn2.values.replaceSubrange(to..<to + row, with: turn1.values[from..<from + row])
            }
        }
        let got2 = try await client.get(model, tokens: tokens)
        #expect(got2.tokens == 70)
        #expect(got2.keys == turn2.keys && got2.values == turn2.values, "turn 2 must send only tokens 40..<70 (seed \(seed))")

        // A GET cut inside a page serves a prefix of that page.
        let cut = try await client.get(model, tokens: tokens, maxTokens: 20)
        #expect(cut.tokens == 20)
        #expect(cut.keys == prefix(turn2.keys, shape: Self.spec.shape, tokens: 70, served: 20))
        #expect(cut.values == prefix(turn2.values, shape: Self.spec.shape, tokens: 70, served: 20))

        let pages = try await client.withLeasedPages(model, tokens: tokens) { leased in
            leased.pages.map { ($0.holdsTokens, $0.servedTokens, $0.arenaOffset != nil) }
        }
        #expect(pages.map(\.0) == [16, 16, 16, 16, 6])
        #expect(pages.map(\.1) == [0..<16, 16..<32, 32..<48, 48..<64, 64..<70])
        #expect(pages.allSatisfy { $0.2 == sharedMemory })
        await client.close()
    }

    /// Bytes put through shared memory come back inline, and the reverse.
    @Test func inlineAndSharedMemoryAgree() async throws {
        let seed = testSeed("DaemonTests.inlineAndSharedMemoryAgree")
        var random = SplitMix64(seed: seed)
        let daemon = try await DaemonProcess.start()
        defer { daemon.stop() }
        let shared = try await KVTierClient.connect(socketPath: daemon.socketPath)
        let inline = try await KVTierClient.connect(socketPath: daemon.socketPath, mapSharedMemory: false)
        #expect(shared.usesSharedMemory && !inline.usesSharedMemory)
        let model = try await shared.registerModel(Self.spec)
        #expect(try await inline.registerModel(Self.spec) == model)
        for (writer, reader) in [(shared, inline), (inline, shared)] {
            let tokens = Self.randomTokens(53, &random)
            let kv = Self.randomKV(tokens: 53, &random)
            #expect(try await writer.put(model, tokens: tokens, keys: kv.keys, values: kv.values) == 53)
            let got = try await reader.get(model, tokens: tokens)
            #expect(got.tokens == 53 && got.keys == kv.keys && got.values == kv.values, "seed \(seed)")
        }
        await shared.close()
        await inline.close()
    }

    /// A client that believes in the wrong shape (one layer, where the daemon registered two)
    /// sends chunks too short for the model: the daemon refuses with a message.
    @Test(arguments: [true, false])
    func shapeMismatchIsAServerError(sharedMemory: Bool) async throws {
        let daemon = try await DaemonProcess.start()
        defer { daemon.stop() }
        let client = try await KVTierClient.connect(socketPath: daemon.socketPath, mapSharedMemory: sharedMemory)
        var wrong = try await client.registerModel(Self.spec)
        wrong.specification.layers = 1
        let elements = wrong.shape.elements(tokens: 16)
        do {
            try await client.put(wrong, tokens: Array(0..<16), keys: [UInt16](repeating: 1, count: elements),
                                 values: [UInt16](repeating: 2, count: elements))
            Issue.record("a put with the wrong shape was accepted")
        } catch let error as KVTierClientError {
            guard case .server(let code, let message) = error else {
                Issue.record("expected a server error, got \(error)")
                return
            }
            #expect(code == .invalidArgument)
            #expect(!message.isEmpty)
            print("shape mismatch (\(sharedMemory ? "shared memory" : "inline")): \(message)")
        }
        // The connection survives the error.
        try await client.ping()
        await client.close()
    }

    /// 2600 tokens of an 8-layer model are 85 MiB: inline, that takes two PUTs (each under
    /// `maxInlineBody`, the second extending the first); through shared memory, one.
    @Test func largeInlinePutIsSplit() async throws {
        let seed = testSeed("DaemonTests.largeInlinePutIsSplit")
        var random = SplitMix64(seed: seed)
        let daemon = try await DaemonProcess.start(ramBudget: "512MiB")
        defer { daemon.stop() }
        let inline = try await KVTierClient.connect(socketPath: daemon.socketPath, mapSharedMemory: false)
        let shared = try await KVTierClient.connect(socketPath: daemon.socketPath)
        let spec = ModelSpecification(name: "client-test-large", layers: 8, kvHeads: 8, headDim: 128, elementType: .bfloat16,
                                      pageTokens: 16, ropeTheta: 500_000)
        let model = try await inline.registerModel(spec)
        let tokens = Self.randomTokens(2600, &random)
        let count = spec.shape.elements(tokens: tokens.count)
        let mix = UInt32(truncatingIfNeeded: random.next())
        let keys = (0..<count).map { UInt16(truncatingIfNeeded: (UInt32(truncatingIfNeeded: $0) &* 2_654_435_761 ^ mix) >> 9) }
        let values = keys.map { $0 ^ 0x5A5A }
        #expect(PageLayout.pageBytes(tokens: tokens.count, shape: spec.shape) > inline.maxInlineBody)

        let putsBefore = try await inline.status()["puts"] ?? 0
        #expect(try await inline.put(model, tokens: tokens, keys: keys, values: values) == tokens.count)
        let putsAfter = try await inline.status()["puts"] ?? 0
        #expect(putsAfter - putsBefore == 2, "85 MiB inline must take two PUTs")

        let got = try await shared.get(model, tokens: tokens)
        #expect(got.tokens == tokens.count)
        #expect(got.keys == keys && got.values == values, "seed \(seed)")
        await inline.close()
        await shared.close()
    }

    @Test func clientSideChecks() async throws {
        let daemon = try await DaemonProcess.start()
        defer { daemon.stop() }
        let client = try await KVTierClient.connect(socketPath: daemon.socketPath)
        let model = try await client.registerModel(Self.spec)
        await #expect(throws: KVTierClientError.self) {
            try await client.put(model, tokens: [1, 2], keys: [1, 2, 3], values: [4, 5, 6])
        }
        await #expect(throws: KVTierClientError.self) {
            _ = try await KVTierClient.connect(socketPath: daemon.directory + "/missing.sock")
        }
        let status = try await client.status()
        #expect(status["puts"] != nil, "STATUS counters: \(status.keys.sorted())")
        #expect(try await client.sessionList().isEmpty)
        do {
            _ = try await client.sessionInfo("missing")
            Issue.record("SESSION_INFO of a missing session succeeded")
        } catch let error as KVTierClientError {
            #expect(error.wireError == .notFound, "\(error)")
        }
        await #expect(throws: KVTierClientError.self) { try await client.release(leaseID: 987_654_321) }
        try await client.ping()
        await client.close()
    }
}
