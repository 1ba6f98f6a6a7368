import KVTierCodec
import KVTierCore
import KVTierIO
import KVTierStore
import KVTierStoreTesting
import KVTierTestProcess
import Logging
import Testing

/// The `auto` codec policy: each tenant's model gets the most compact candidate whose attention
/// error on the model's own first pages is within the bound; a later sample past the bound moves
/// new pages to a safer codec, and pages already written keep theirs.
@Suite struct CodecPolicyTests {
    typealias Store = TieredStoreTests
    static let alice = Store.alice
    static let bob = Store.bob
    static let model = ModelSpec(id: 0xC0DEC, name: "policy-test", layers: 4, kvHeads: 2, headDim: 64, elementType: .float16, pageTokens: 64)
    static let candidates = ["tq3", "tq4", "k4v4", "q8", "fp16"].map { try! Codec(name: $0) }

    /// Two kinds of KV (float16, page layout). `smooth`: a strong per-channel component shared by
    /// every token plus small noise, which rotation codecs code well (tq3 stays within 15 %).
    /// `spiky`: heavy-tailed noise, one element in 20 twenty times larger, where tq3's error is
    /// several times the bound and tq4's is within it.
    enum Kind { case smooth, spiky }

    static func page(_ kind: Kind, seed: UInt64) -> PageBuffer {
        let m = model
        var random = SplitMix64(seed: seed)
        // The shared component depends on the layer, head and channel only (not the seed's page).
        var shared = SplitMix64(seed: 0x5EED)
        let base = (0..<(m.layers * m.kvHeads * m.headDim)).map { _ in 3 * gaussian(&shared) }
        let buffer = PageBuffer(byteCount: m.pageTokens * m.bytesPerToken)
        let out = buffer.bytes.bindMemory(to: Float16.self)
        var at = 0
        for layer in 0..<m.layers {
            for _ in 0..<2 {  // keys, then values
                for _ in 0..<m.pageTokens {
                    for h in 0..<m.kvHeads {
                        for d in 0..<m.headDim {
                            let x: Float = switch kind {
                            case .smooth: base[(layer * m.kvHeads + h) * m.headDim + d] + 0.3 * gaussian(&random)
                            case .spiky: gaussian(&random) * (random.next() % 20 == 0 ? 20 : 1)
                            }
                            out[at] = Float16(x)
                            at += 1
                        }
                    }
                }
            }
        }
        return buffer
    }

    /// Pages made on a thread of their own (as every CPU-heavy step here): a debug build takes
    /// long enough that blocking the cooperative pool starves other suites' in-process servers.
    static func pages(_ kind: Kind, seeds: Range<UInt64>) async -> [PageBuffer] {
        await EventWaits.onThread { seeds.map { page(kind, seed: $0) } }
    }

    static func gaussian(_ random: inout SplitMix64) -> Float {
        let u = max(Float(random.next() >> 40) / Float(1 << 24), 1e-7), v = Float(random.next() >> 40) / Float(1 << 24)
        return (-2 * Float.log(u)).squareRoot() * Float.cos(2 * .pi * v)
    }

    static func store(_ policy: CodecPolicy.Configuration, storage: SimulatedStorage) throws -> TieredStore {
        var configuration = TieredStore.Configuration()
        configuration.ramBudgetBytes = 64 << 20
        configuration.minResidenceMicros = 0
        configuration.arenaBytes = 256 << 20
        configuration.codecPolicy = policy
        let disk = try DiskTier(storage: storage, logger: Store.logger)
        let store = TieredStore(configuration: configuration, disk: disk, logger: Store.logger) { tenant in
            try ArenaPageMemory(name: "kvtier-codec-policy-\(tenant)", capacity: 256 << 20, stagingCapacity: 64 << 20, logger: Store.logger)
        }
        try store.register(model)
        return store
    }

    static func policy(bound: Double = 0.15, samplePages: Int = 4, checkEvery: Int = 64) -> CodecPolicy.Configuration {
        var c = CodecPolicy.Configuration()
        c.mode = .auto
        c.maxAttentionError = bound
        c.candidates = candidates
        c.samplePages = samplePages
        c.checkEvery = checkEvery
        return c
    }

    /// Puts `pages` as one sequence of fresh tokens (`first` the first token id).
    static func put(_ store: TieredStore, _ tenant: TenantID, _ pages: [PageBuffer], first: UInt32) async throws -> [UInt32] {
        let tokens = (0..<(pages.count * model.pageTokens)).map { first + UInt32($0) }
        let put = try await store.put(tenant, owner: 1, modelID: model.id, tokens: tokens, dataStart: 0, chunks: pages.map { .bytes($0) },
                                      durable: false)
        #expect(put.newPages == pages.count)
        return tokens
    }

    /// What `CodecAdvisor` chooses on `pages` (every layer: the model has fewer than `sampleLayers`),
    /// measured on a thread of its own.
    static func advised(_ pages: [PageBuffer], bound: Double, codecs: [Codec] = candidates,
                        endQueries: [[UInt16]]? = nil, queryHeads: Int? = nil) async throws -> CodecAdvisor.Report {
        try await EventWaits.onThread { Result { try advisedNow(pages, bound: bound, codecs: codecs, endQueries: endQueries, queryHeads: queryHeads) } }.get()
    }

    static func advisedNow(_ pages: [PageBuffer], bound: Double, codecs: [Codec], endQueries: [[UInt16]]?, queryHeads: Int?) throws -> CodecAdvisor.Report {
        let m = model
        let part = m.pageTokens * m.kvHeads * m.headDim
        var keys = Array(repeating: [UInt16](), count: m.layers), values = keys
        for page in pages {
            let elements = page.bytes.bindMemory(to: UInt16.self)
            for layer in 0..<m.layers {
                keys[layer] += elements[(2 * layer) * part..<(2 * layer + 1) * part]
                values[layer] += elements[(2 * layer + 1) * part..<(2 * layer + 2) * part]
            }
        }
        var options = CodecAdvisor.Options()
        options.pageTokens = m.pageTokens
        options.codecs = codecs
        let tensors = try AdvisorTensors(tokens: pages.count * m.pageTokens, kvHeads: m.kvHeads, headDim: m.headDim, keys: keys, values: values,
                                         queryHeads: queryHeads, endQueries: endQueries)
        return try CodecAdvisor(tensors: tensors, options: options).run(maxAttentionError: bound)
    }

    static func diskCodecs(_ store: TieredStore, _ tenant: TenantID) -> [Codec?] {
        store.pageSummaries(tenant, modelID: model.id).map(\.diskCodec)
    }

    @Test func autoChoosesWhatTheAdvisorChoosesOnTheModelsFirstPagesAndWritesPagesWithIt() async throws {
        let store = try Self.store(Self.policy(), storage: SimulatedStorage(seed: 3))
        #expect(store.codecPolicy.choice(for: Self.model, tenant: Self.alice).phase == .measuring)
        #expect(store.codecPolicy.codec(for: Self.model, tenant: Self.alice) == Codec(.k4v4), "diskCodec until measured")

        let pages = await Self.pages(.smooth, seeds: 0..<4)
        _ = try await Self.put(store, Self.alice, pages, first: 0)
        await store.codecPolicy.idle()

        let expected = try await Self.advised(pages, bound: 0.15)
        let choice = store.codecPolicy.choice(for: Self.model, tenant: Self.alice)
        #expect(choice.phase == .chosen, "\(choice.message)")
        #expect(choice.codec.name == expected.codec, "\(choice.message); the advisor says \(expected.message)")
        #expect(choice.codec == Codec(.tq3), "smooth KV is within 15 % at 3 bits: \(choice.message)")
        #expect(abs((choice.attentionError ?? .nan) - (expected.attentionError ?? .nan)) < 1e-9)
        #expect(choice.sampledTokens == 4 * Self.model.pageTokens && choice.sampledLayers == Self.model.layers)

        let evicted = try await store.evict(Self.alice, modelID: Self.model.id, tokens: nil, deleteFromDisk: false)
        #expect(evicted.evicted == 4)
        #expect(Self.diskCodecs(store, Self.alice) == Array(repeating: Codec(.tq3), count: 4))
        #expect(store.codecPolicy.counters.measurements == 1 && store.codecPolicy.counters.choices == 1)
        let status = Dictionary(store.status().map { ($0.name, $0.value) }, uniquingKeysWith: { a, _ in a })
        #expect(status["codec_policy_auto"] == 1 && status["codec_choices"] == 1 && status["codec_sample_bytes"] == 0)
    }

    @Test func aCheckPastTheBoundMovesNewPagesToASaferCodecAndOldPagesKeepTheirs() async throws {
        let store = try Self.store(Self.policy(samplePages: 2, checkEvery: 4), storage: SimulatedStorage(seed: 4))
        let smooth = await Self.pages(.smooth, seeds: 100..<102)
        let early = try await Self.put(store, Self.alice, smooth, first: 0)
        await store.codecPolicy.idle()
        #expect(store.codecPolicy.choice(for: Self.model, tenant: Self.alice).codec == Codec(.tq3))
        _ = try await store.evict(Self.alice, modelID: Self.model.id, tokens: nil, deleteFromDisk: false)

        // Four more pages reach `checkEvery`: the first two are the check's sample.
        let spiky = await Self.pages(.spiky, seeds: 200..<204)
        let late = try await Self.put(store, Self.alice, spiky, first: 10_000)
        await store.codecPolicy.idle()
        let inForce = try await Self.advised(Array(spiky.prefix(2)), bound: 0.15, codecs: [Codec(.tq3)])
        let safer = try await Self.advised(Array(spiky.prefix(2)), bound: 0.15, codecs: Self.candidates.filter { $0 != Codec(.tq3) })
        #expect((inForce.candidates[0].attentionError ?? 0) > 0.15, "the spiky pages break tq3: \(inForce.message)")

        let choice = store.codecPolicy.choice(for: Self.model, tenant: Self.alice)
        #expect(choice.phase == .fellBack && choice.checks == 1 && choice.fallbacks == 1, "\(choice.message)")
        #expect(choice.codec.name == safer.codec, "\(choice.message); the advisor says \(safer.message)")
        #expect(choice.codec == Codec(.tq4), "\(choice.message)")
        #expect(abs((choice.lastCheckError ?? .nan) - (inForce.candidates[0].attentionError ?? .nan)) < 1e-9)

        _ = try await store.evict(Self.alice, modelID: Self.model.id, tokens: nil, deleteFromDisk: false)
        let byTokens = Dictionary(uniqueKeysWithValues: store.pageSummaries(Self.alice, modelID: Self.model.id).map { ($0.address.key, $0.diskCodec) })
        let earlyKeys = PageKeyChain.keys(modelID: Self.model.id, tokens: early, pageTokens: Self.model.pageTokens)
        let lateKeys = PageKeyChain.keys(modelID: Self.model.id, tokens: late, pageTokens: Self.model.pageTokens)
        #expect(earlyKeys.map { byTokens[$0] } == [Codec(.tq3), Codec(.tq3)], "pages written before the check keep tq3")
        #expect(lateKeys.map { byTokens[$0] } == Array(repeating: Codec(.tq4), count: 4))
        // Both codecs still decode: every page reads back.
        let got = try await store.get(Self.alice, owner: 1, modelID: Self.model.id, tokens: late, maxTokens: 0)
        #expect(got.tokens == late.count)
        try store.release(Self.alice, leaseID: got.leaseID)
    }

    @Test func aTenantsChoiceComesFromItsOwnPagesOnly() async throws {
        let store = try Self.store(Self.policy(), storage: SimulatedStorage(seed: 5))
        _ = try await Self.put(store, Self.alice, await Self.pages(.smooth, seeds: 0..<4), first: 0)
        await store.codecPolicy.idle()
        #expect(store.codecPolicy.choice(for: Self.model, tenant: Self.alice).codec == Codec(.tq3))
        #expect(store.codecPolicy.choice(for: Self.model, tenant: Self.bob).phase == .measuring)

        _ = try await Self.put(store, Self.bob, await Self.pages(.spiky, seeds: 50..<54), first: 0)
        await store.codecPolicy.idle()
        let bob = store.codecPolicy.choice(for: Self.model, tenant: Self.bob)
        #expect(bob.phase == .chosen && bob.codec != Codec(.tq3), "\(bob.message)")
        #expect(store.codecPolicy.choice(for: Self.model, tenant: Self.alice).codec == Codec(.tq3), "bob's pages never move alice's codec")
    }

    @Test func fixedPoliciesAndModelsWithTheirOwnCodecAreNeverSampled() async throws {
        var fixed = Self.policy()
        fixed.mode = .fixed
        let store = try Self.store(fixed, storage: SimulatedStorage(seed: 6))
        _ = try await Self.put(store, Self.alice, await Self.pages(.smooth, seeds: 0..<4), first: 0)
        await store.codecPolicy.idle()
        #expect(store.codecPolicy.choice(for: Self.model, tenant: Self.alice).phase == .fixed)
        #expect(store.codecPolicy.counters.measurements == 0)

        let auto = try Self.store(Self.policy(), storage: SimulatedStorage(seed: 7))
        var own = Self.model
        own.id = 0xC0DED
        own.diskCodec = Codec(.q8)
        try auto.register(own)
        let tokens = (0..<256).map { UInt32($0) }
        _ = try await auto.put(Self.alice, owner: 1, modelID: own.id, tokens: tokens, dataStart: 0,
                               chunks: await Self.pages(.smooth, seeds: 0..<4).map { .bytes($0) }, durable: false)
        await auto.codecPolicy.idle()
        let choice = auto.codecPolicy.choice(for: own, tenant: Self.alice)
        #expect(choice.phase == .fixed && choice.codec == Codec(.q8))
        #expect(auto.codecPolicy.counters.measurements == 0)
    }

    /// `[layers, count, queryHeads, headDim]` float16 queries, N(0, 2).
    static func queries(count: Int, queryHeads: Int, seed: UInt64) -> [UInt16] {
        var random = SplitMix64(seed: seed)
        return (0..<(model.layers * count * queryHeads * model.headDim)).map { _ in Float16(2 * gaussian(&random)).bitPattern }
    }

    @Test func reportedQueriesReplaceTheKeysAndTheLatestEightAreKept() async throws {
        let store = try Self.store(Self.policy(), storage: SimulatedStorage(seed: 8))
        let (heads, d, layers) = (4, Self.model.headDim, Self.model.layers)
        let first = Self.queries(count: 6, queryHeads: heads, seed: 1), second = Self.queries(count: 6, queryHeads: heads, seed: 2)
        for batch in [first, second] {
            try store.codecPolicy.report(queries: batch, layers: layers, queryHeads: heads, headDim: d, count: 6, model: Self.model, tenant: Self.alice)
        }
        let pages = await Self.pages(.smooth, seeds: 40..<44)
        _ = try await Self.put(store, Self.alice, pages, first: 0)
        await store.codecPolicy.idle()
        let choice = store.codecPolicy.choice(for: Self.model, tenant: Self.alice)
        #expect(choice.queriesFrom == "queries", "\(choice.message)")

        // The advisor with the latest 8: the last 2 of the first report, then the 6 of the second.
        let vector = heads * d
        let kept = (0..<layers).map { layer in
            Array(first[(layer * 6 + 4) * vector..<(layer * 6 + 6) * vector]) + Array(second[(layer * 6) * vector..<(layer * 6 + 6) * vector])
        }
        let expected = try await Self.advised(pages, bound: 0.15, endQueries: kept, queryHeads: heads)
        #expect(expected.queriesFrom == "end queries" && expected.queryPositionsPerLayer == 8)
        #expect(choice.codec.name == expected.codec, "\(choice.message); the advisor says \(expected.message)")
        #expect(abs((choice.attentionError ?? .nan) - (expected.attentionError ?? .nan)) < 1e-9)
        let proxy = try await Self.advised(pages, bound: 0.15)
        #expect(expected.attentionError != proxy.attentionError, "the queries changed what was measured")
        #expect(store.codecPolicy.counters.queriesReported == 2)
    }

    @Test func queriesOfTheWrongShapeOrNotFiniteAreRefused() throws {
        let store = try Self.store(Self.policy(), storage: SimulatedStorage(seed: 9))
        let (layers, d) = (Self.model.layers, Self.model.headDim)
        func refusal(_ body: () throws -> Void) -> String {
            do { try body(); return "accepted" } catch { return "\(error)" }
        }
        let good = Self.queries(count: 1, queryHeads: 2, seed: 3)
        #expect(refusal { try store.codecPolicy.report(queries: good, layers: layers - 1, queryHeads: 2, headDim: d, count: 1, model: Self.model, tenant: Self.alice) }.contains("layers"))
        #expect(refusal { try store.codecPolicy.report(queries: good, layers: layers, queryHeads: 3, headDim: d, count: 1, model: Self.model, tenant: Self.alice) }.contains("multiple"))
        #expect(refusal { try store.codecPolicy.report(queries: Array(good.dropLast()), layers: layers, queryHeads: 2, headDim: d, count: 1, model: Self.model, tenant: Self.alice) }.contains("elements"))
        var nan = good
        nan[5] = 0x7E00
        #expect(refusal { try store.codecPolicy.report(queries: nan, layers: layers, queryHeads: 2, headDim: d, count: 1, model: Self.model, tenant: Self.alice) }.contains("NaN"))
        #expect(refusal { try store.codecPolicy.report(queries: good, layers: layers, queryHeads: 2, headDim: d, count: 1, model: Self.model, tenant: Self.alice) } == "accepted")
        #expect(store.codecPolicy.counters.queriesReported == 1)
    }

    @Test func keptLayersAreEvenlySpacedAndIncludeBothEnds() {
        #expect(CodecPolicy.keptLayers(4, limit: 8) == [0, 1, 2, 3])
        #expect(CodecPolicy.keptLayers(30, limit: 8) == [0, 4, 8, 12, 17, 21, 25, 29])
        #expect(CodecPolicy.keptLayers(9, limit: 1) == [0])
    }
}
