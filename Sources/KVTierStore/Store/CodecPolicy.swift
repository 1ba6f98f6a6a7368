#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Dispatch
import KVTierCodec
import KVTierCore
import Synchronization

/// Which codec the disk tier writes each tenant's model with.
///
/// `fixed`: the daemon's `diskCodec`. `auto`: measured per tenant and model, on that tenant's own
/// pages (another tenant's data never decides what this one's pages become). The first
/// `samplePages` full pages a model stores are copied (at most `sampleLayers` evenly spaced
/// layers) and every candidate codec round-trips them as the disk tier would
/// (`CodecAdvisor`, attention error with the keys standing in for the queries); the most compact
/// candidate whose attention error is within `maxAttentionError` is chosen. Until then pages are
/// written with `diskCodec`. Afterwards one sample in every `checkEvery` full pages is measured
/// again with the codec in force; past the bound, the policy falls back to a safer codec (more
/// bits per element) for pages written from then on. A page's record names its codec, so pages
/// already written are never reinterpreted. A model registered with its own codec keeps it.
///
/// Measurements run one at a time on a background queue; their samples are bounded
/// (`maxSampleBytes` in all), and a put only copies a sample when the bound has room.
public final class CodecPolicy: Sendable {
    public struct Configuration: Sendable, Equatable {
        public enum Mode: String, Sendable, CaseIterable {
            case fixed, auto
        }

        public var mode = Mode.fixed
        /// Most attention-output error (a fraction: 0.15 = 15 %) a chosen codec may show on the
        /// sample, measured as `kvtier codec advise` does.
        public var maxAttentionError = 0.15
        /// The codecs the policy may choose from (ties go to the earlier one).
        public var candidates: [Codec] = Quantizer.allCases.map { Codec($0) }
        /// Full pages a measurement samples.
        public var samplePages = 4
        /// Most layers a sample keeps, evenly spaced from the first to the last.
        public var sampleLayers = 8
        /// After the choice, a new sample is taken once this many more full pages were stored.
        public var checkEvery = 64
        public init() {}
    }

    /// What the policy decided for one tenant's model (`CODECS`, `kvtier status`).
    public struct Choice: Sendable, Equatable {
        public enum Phase: String, Sendable {
            /// Pages are written with the daemon's `diskCodec` until the first sample is measured.
            case measuring
            /// The first sample chose `codec`.
            case chosen
            /// A later sample measured the codec past the bound; `codec` is the safer one after it.
            case fellBack = "fell-back"
            /// The model was registered with its own codec, or the policy is `fixed`.
            case fixed
        }

        public var modelID: UInt64
        public var phase: Phase
        /// The codec new pages are written with.
        public var codec: Codec
        /// The attention error `codec` showed on the sample that chose it (nil: not measured).
        public var attentionError: Double?
        /// The bound in force.
        public var maxAttentionError: Double
        /// The last check's attention error of the codec then in force.
        public var lastCheckError: Double?
        /// Samples measured after the first (checks), and how many of them led to a fallback.
        public var checks: Int
        public var fallbacks: Int
        /// Tokens × layers of the last sample measured.
        public var sampledTokens: Int
        public var sampledLayers: Int
        /// "keys": the keys stood in for the queries; "queries": decode queries a client reported
        /// (`report(queries:)`).
        public var queriesFrom: String
        /// One sentence on the last decision.
        public var message: String
    }

    public let configuration: Configuration
    /// The codec of models the policy has not measured yet (the daemon's `diskCodec`).
    public let defaultCodec: Codec
    /// Bytes of page data held in samples (being filled, waiting or being measured), at most.
    public static let maxSampleBytes = 128 << 20
    /// Reported decode queries kept per tenant and model (the latest), and their bytes over all.
    public static let keptQueries = 8
    public static let maxQueryBytes = 32 << 20

    private struct Key: Hashable {
        var tenant: TenantID
        var modelID: UInt64
    }

    /// A sample being filled: per kept layer, the keys and values of the pages so far.
    private struct Sample {
        var layers: [Int]
        var keys: [[UInt16]]
        var values: [[UInt16]]
        var tokens = 0
        var pages = 0
        var bytes: Int { 2 * keys.reduce(0) { $0 + $1.count * 2 } }
    }

    private struct Entry {
        var choice: Choice
        var shape: ModelShape
        var pageTokens: Int
        var sample: Sample?
        /// The latest reported decode queries (at most `keptQueries`), per kept layer
        /// `[count, queryHeads, headDim]`; empty until a client reports some.
        var queries: [[UInt16]] = []
        var queryHeads = 0
        var queryCount: Int { queries.first.map { $0.count / max(1, queryHeads * shape.headDim) } ?? 0 }
        var queryBytes: Int { queries.reduce(0) { $0 + $1.count * 2 } }
        /// Full pages stored since the last sample was taken (the first sample starts at once).
        var pagesSinceSample = 0
        var measuring = false
    }

    private struct State {
        var entries: [Key: Entry] = [:]
        var sampleBytes = 0
        var queryBytes = 0
        /// A measurement is queued or running.
        var busy = false
        /// Callers of `idle()` waiting for `busy` to clear.
        var idleWaiters: [CheckedContinuation<Void, Never>] = []
        var counters = Counters()
    }

    public struct Counters: Sendable, Equatable {
        public var measurements = 0
        public var choices = 0
        public var checks = 0
        public var fallbacks = 0
        public var samplesSkipped = 0
        public var queriesReported = 0
        public var queriesDropped = 0
    }

    private let state = Mutex(State())
    private let queue = DispatchQueue(label: "kvtier.codec.policy", qos: .utility)

    public init(configuration: Configuration, defaultCodec: Codec) {
        self.configuration = configuration
        self.defaultCodec = defaultCodec
    }

    /// The codec a page of `model`, stored by `tenant`, is written with now.
    public func codec(for model: ModelSpec, tenant: TenantID) -> Codec {
        if let own = model.diskCodec { return own }
        guard configuration.mode == .auto else { return defaultCodec }
        return state.withLock { $0.entries[Key(tenant: tenant, modelID: model.id)]?.choice.codec } ?? defaultCodec
    }

    /// How many of the full pages a put of `model` is storing the policy wants copied (0 for
    /// most puts). The put then calls `offer` with that many pages' data.
    func pagesWanted(for model: ModelSpec, tenant: TenantID, fullPages: Int) -> Int {
        guard configuration.mode == .auto, model.diskCodec == nil, fullPages > 0 else { return 0 }
        return state.withLock { s -> Int in
            let key = Key(tenant: tenant, modelID: model.id)
            var entry = s.entries[key] ?? Self.newEntry(model, configuration: configuration, defaultCodec: defaultCodec)
            defer { s.entries[key] = entry }
            // A sample being measured, or full and waiting for the queue, takes no more pages.
            guard !entry.measuring, (entry.sample?.pages ?? 0) < configuration.samplePages else { return 0 }
            let sampling = entry.sample != nil || entry.choice.phase == .measuring
                || entry.pagesSinceSample + fullPages >= configuration.checkEvery
            guard sampling else {
                entry.pagesSinceSample += fullPages
                return 0
            }
            let have = entry.sample?.pages ?? 0
            let wanted = min(fullPages, configuration.samplePages - have)
            let bytes = wanted * Self.sampleBytesPerPage(entry, configuration: configuration)
            guard wanted > 0, s.sampleBytes + bytes <= Self.maxSampleBytes else {
                s.counters.samplesSkipped += 1
                return 0
            }
            s.sampleBytes += bytes
            entry.pagesSinceSample = 0
            return wanted
        }
    }

    /// Copies the kept layers of `pages` (full pages of `model`, in sequence order, each laid out
    /// as docs/protocol.md's "Data layout" says) into the model's sample; a sample that now holds
    /// `samplePages` pages is measured in the background.
    func offer(_ pages: [UnsafeRawBufferPointer], model: ModelSpec, tenant: TenantID) {
        guard !pages.isEmpty else { return }
        let key = Key(tenant: tenant, modelID: model.id)
        // Copied outside the lock: `pagesWanted` reserved the bytes and the entry.
        let layers = Self.keptLayers(model.layers, limit: configuration.sampleLayers)
        let part = model.pageTokens * model.kvHeads * model.headDim
        var keys = layers.map { _ in [UInt16]() }, values = keys
        for page in pages {
            for (i, layer) in layers.enumerated() {
                let section = page.baseAddress!.advanced(by: layer * 2 * part * 2)
                keys[i].append(contentsOf: UnsafeBufferPointer(start: section.assumingMemoryBound(to: UInt16.self), count: part))
                values[i].append(contentsOf: UnsafeBufferPointer(start: section.advanced(by: part * 2).assumingMemoryBound(to: UInt16.self), count: part))
            }
        }
        let ready = state.withLock { s -> (Entry, Sample)? in
            guard var entry = s.entries[key] else { return nil }
            var sample = entry.sample ?? Sample(layers: layers, keys: layers.map { _ in [] }, values: layers.map { _ in [] })
            for i in layers.indices {
                sample.keys[i] += keys[i]
                sample.values[i] += values[i]
            }
            sample.pages += pages.count
            sample.tokens += pages.count * model.pageTokens
            entry.sample = sample
            defer { s.entries[key] = entry }
            guard sample.pages >= configuration.samplePages, !s.busy else { return nil }
            s.busy = true
            entry.measuring = true
            return (entry, sample)
        }
        if let (entry, sample) = ready { measure(key, entry, sample) }
    }

    /// Keeps a decoding step's queries (`elements`: `[layers, count, queryHeads, headDim]`, the
    /// model's element type, after RoPE) for `tenant`'s `model`: later measurements attend with
    /// them instead of the keys. Only the kept layers and the latest `keptQueries` are held;
    /// ignored for models the policy does not measure. Throws for a shape that is not the
    /// model's, or non-finite values.
    public func report(queries elements: [UInt16], layers: Int, queryHeads: Int, headDim: Int, count: Int,
                       model: ModelSpec, tenant: TenantID) throws(StoreError) {
        guard layers == model.layers, headDim == model.headDim else {
            throw .invalidArgument("query sample is \(layers) layers × head dim \(headDim) but model \(model.name) has \(model.layers) × \(model.headDim)")
        }
        guard queryHeads >= 1, queryHeads % model.kvHeads == 0, queryHeads <= model.kvHeads * 64 else {
            throw .invalidArgument("query sample has \(queryHeads) query heads: send a multiple of the model's \(model.kvHeads) KV heads, at most 64 times as many")
        }
        guard count >= 1, elements.count == layers * count * queryHeads * headDim else {
            throw .invalidArgument("query sample holds \(elements.count) elements, not layers × count × queryHeads × headDim")
        }
        let exponent: UInt16 = model.elementType == .float16 ? 0x7C00 : 0x7F80
        if let bad = elements.firstIndex(where: { $0 & exponent == exponent }) {
            throw .invalidArgument("query sample element \(bad) is NaN or infinite: send finite queries")
        }
        guard configuration.mode == .auto, model.diskCodec == nil else { return }
        let kept = Self.keptLayers(layers, limit: configuration.sampleLayers)
        let vector = queryHeads * headDim
        let take = min(count, Self.keptQueries)
        let fresh = kept.map { layer in Array(elements[(layer * count + count - take) * vector..<(layer * count + count) * vector]) }
        state.withLock { s in
            let key = Key(tenant: tenant, modelID: model.id)
            var entry = s.entries[key] ?? Self.newEntry(model, configuration: configuration, defaultCodec: defaultCodec)
            let before = entry.queryBytes
            if entry.queryHeads != queryHeads {
                entry.queries = []
                entry.queryHeads = queryHeads
            }
            let keep = min(Self.keptQueries - take, entry.queryCount) * vector
            let merged = entry.queries.isEmpty ? fresh : zip(entry.queries, fresh).map { Array($0.0.suffix(keep)) + $0.1 }
            let after = merged.reduce(0) { $0 + $1.count * 2 }
            guard s.queryBytes - before + after <= Self.maxQueryBytes else {
                s.counters.queriesDropped += 1
                return
            }
            s.queryBytes += after - before
            entry.queries = merged
            s.counters.queriesReported += 1
            s.entries[key] = entry
        }
    }

    /// Every tenant's measured models (metrics), by tenant then model id.
    public func everyChoice() -> [(tenant: TenantID, choice: Choice, bitsPerElement: Double)] {
        state.withLock { s in
            s.entries.map { key, entry in
                let page = SectionShape(tokens: entry.pageTokens, kvHeads: entry.shape.kvHeads, headDim: entry.shape.headDim,
                                        elementType: entry.shape.elementType)
                return (key.tenant, entry.choice, entry.choice.codec.quantizer.bitsPerElement(page))
            }
        }.sorted { ($0.tenant, $0.choice.modelID) < ($1.tenant, $1.choice.modelID) }
    }

    /// What the policy decided for `tenant`'s `model`: a model registered with its own codec,
    /// or any model when the policy is `fixed`, is `fixed`; an auto model no page of which was
    /// stored yet is `measuring`.
    public func choice(for model: ModelSpec, tenant: TenantID) -> Choice {
        var fixed = Self.newEntry(model, configuration: configuration, defaultCodec: defaultCodec).choice
        if let own = model.diskCodec {
            fixed.phase = .fixed
            fixed.codec = own
            fixed.message = "registered with its own disk codec"
            return fixed
        }
        guard configuration.mode == .auto else {
            fixed.phase = .fixed
            fixed.message = "codecPolicy is fixed: the daemon's diskCodec"
            return fixed
        }
        return state.withLock { $0.entries[Key(tenant: tenant, modelID: model.id)]?.choice } ?? fixed
    }

    public var counters: Counters { state.withLock { $0.counters } }

    /// `STATUS` figures.
    func status() -> [(name: String, value: UInt64)] {
        let (c, measuring, bytes) = state.withLock { s in
            (s.counters, s.entries.values.filter { $0.choice.phase == .measuring }.count, s.sampleBytes)
        }
        return [("codec_policy_auto", configuration.mode == .auto ? 1 : 0), ("codec_measurements", UInt64(c.measurements)),
                ("codec_choices", UInt64(c.choices)), ("codec_checks", UInt64(c.checks)),
                ("codec_fallbacks", UInt64(c.fallbacks)), ("codec_models_measuring", UInt64(measuring)),
                ("codec_sample_bytes", UInt64(bytes)), ("codec_samples_skipped", UInt64(c.samplesSkipped)),
                ("codec_query_samples", UInt64(c.queriesReported)), ("codec_query_samples_dropped", UInt64(c.queriesDropped))]
    }

    /// Returns once no measurement is queued or running (tests, shutdown).
    public func idle() async {
        await withCheckedContinuation { continuation in
            let now = state.withLock { s -> Bool in
                if !s.busy { return true }
                s.idleWaiters.append(continuation)
                return false
            }
            if now { continuation.resume() }
        }
    }

    // MARK: - Measuring

    private enum Next {
        case next(Key, Entry, Sample)
        case idle([CheckedContinuation<Void, Never>])
    }

    private func measure(_ key: Key, _ entry: Entry, _ sample: Sample) {
        queue.async { [self] in
            let decided = Self.decide(entry, sample, configuration: configuration)
            let next = state.withLock { s -> Next in
                s.sampleBytes -= sample.bytes
                s.counters.measurements += 1
                if var current = s.entries[key] {
                    if current.choice.phase == .measuring { s.counters.choices += 1 } else { s.counters.checks += 1 }
                    if decided.phase == .fellBack, current.choice.codec != decided.codec { s.counters.fallbacks += 1 }
                    current.choice = decided
                    current.sample = nil
                    current.measuring = false
                    current.pagesSinceSample = 0
                    s.entries[key] = current
                }
                // Another model's sample may have filled while this one ran.
                guard let (nextKey, nextEntry) = s.entries.first(where: { !$0.value.measuring && ($0.value.sample?.pages ?? 0) >= configuration.samplePages }) else {
                    s.busy = false
                    let waiters = s.idleWaiters
                    s.idleWaiters = []
                    return .idle(waiters)
                }
                s.entries[nextKey]?.measuring = true
                return .next(nextKey, nextEntry, nextEntry.sample!)
            }
            switch next {
            case .next(let nextKey, let nextEntry, let nextSample): measure(nextKey, nextEntry, nextSample)
            case .idle(let waiters): for waiter in waiters { waiter.resume() }
            }
        }
    }

    /// The entry's choice after measuring `sample`: the first sample picks the most compact
    /// candidate within the bound; a later one keeps the codec in force while it stays within
    /// the bound, and otherwise moves to the most compact candidate with more bits that is
    /// within it (the candidate with the lowest error when none is).
    private static func decide(_ entry: Entry, _ sample: Sample, configuration: Configuration) -> Choice {
        var choice = entry.choice
        let bound = configuration.maxAttentionError
        let first = choice.phase == .measuring
        choice.sampledTokens = sample.tokens
        choice.sampledLayers = sample.layers.count
        func percent(_ x: Double) -> String { formatDecimal(x * 100, places: 2) + " %" }
        do throws(AdvisorError) {
            // Reported queries when a client sent some (kept for the same layers as the sample).
            let queries = entry.queries.isEmpty ? nil : entry.queries
            let tensors = try AdvisorTensors(tokens: sample.tokens, kvHeads: entry.shape.kvHeads, headDim: entry.shape.headDim,
                                             keys: sample.keys, values: sample.values, queryHeads: queries == nil ? nil : entry.queryHeads,
                                             endQueries: queries, elementType: entry.shape.elementType)
            choice.queriesFrom = queries == nil ? "keys" : "queries"
            var options = CodecAdvisor.Options()
            options.pageTokens = entry.pageTokens
            let page = SectionShape(tokens: entry.pageTokens, kvHeads: entry.shape.kvHeads, headDim: entry.shape.headDim,
                                    elementType: entry.shape.elementType)
            func bits(_ codec: Codec) -> Double { codec.quantizer.bitsPerElement(page) }
            if !first {
                options.codecs = [choice.codec]
                let inForce = try CodecAdvisor(tensors: tensors, options: options).measure().first?.attentionError
                choice.checks += 1
                choice.lastCheckError = inForce
                if let inForce, inForce <= bound {
                    choice.message = "check \(choice.checks): \(choice.codec.name) measured \(percent(inForce)), within \(percent(bound))"
                    return choice
                }
                // Only safer codecs: the pages written so far were fine with the one in force.
                options.codecs = configuration.candidates.filter { bits($0) > bits(choice.codec) }
                guard !options.codecs.isEmpty else {
                    choice.message = "check \(choice.checks): \(choice.codec.name) measured \(inForce.map(percent) ?? "no error"), past \(percent(bound)), and no candidate has more bits: kept"
                    return choice
                }
            } else {
                options.codecs = configuration.candidates
            }
            let advisor = try CodecAdvisor(tensors: tensors, options: options)
            let candidates = advisor.measure()
            let report = try advisor.report(candidates, maxAttentionError: bound)
            let picked: CodecAdvisor.Candidate? = report.codec.flatMap { name in candidates.first { $0.codec == name } }
                ?? candidates.filter { $0.attentionError != nil }.min { $0.attentionError! < $1.attentionError! }
            guard let picked, let codec = try? Codec(name: picked.codec) else {
                choice.message = "no candidate codec can encode this model's pages (\(candidates.compactMap(\.skipped).first ?? "none measured")); writing \(choice.codec.name)"
                if first { choice.phase = .chosen }
                return choice
            }
            let previous = choice.codec
            choice.codec = codec
            choice.attentionError = picked.attentionError
            if first {
                choice.phase = .chosen
                choice.message = report.codec != nil
                    ? "chose \(codec.name) (\(formatDecimal(bits(codec), places: 3)) bits/element): attention error \(percent(picked.attentionError!)) within \(percent(bound)) on \(sample.tokens) tokens × \(sample.layers.count) layers"
                    : "no candidate within \(percent(bound)); chose \(codec.name), the lowest error (\(percent(picked.attentionError!)))"
            } else {
                choice.phase = .fellBack
                choice.fallbacks += 1
                choice.message = "check \(choice.checks): \(previous.name) measured \(choice.lastCheckError.map(percent) ?? "no error"), past \(percent(bound)); new pages use \(codec.name) (\(percent(picked.attentionError!)))"
            }
        } catch {
            choice.message = "not measured: \(error)"
            if first { choice.phase = .chosen }
        }
        return choice
    }

    private static func newEntry(_ model: ModelSpec, configuration: Configuration, defaultCodec: Codec) -> Entry {
        Entry(choice: Choice(modelID: model.id, phase: .measuring, codec: defaultCodec, attentionError: nil,
                             maxAttentionError: configuration.maxAttentionError, lastCheckError: nil, checks: 0, fallbacks: 0,
                             sampledTokens: 0, sampledLayers: 0, queriesFrom: "keys",
                             message: "measuring: the first \(configuration.samplePages) full pages are sampled; until then pages are written with \(defaultCodec.name)"),
              shape: model.shape, pageTokens: model.pageTokens)
    }

    private static func sampleBytesPerPage(_ entry: Entry, configuration: Configuration) -> Int {
        keptLayers(entry.shape.layers, limit: configuration.sampleLayers).count * 2 * entry.pageTokens * entry.shape.kvHeads
            * entry.shape.headDim * 2
    }

    /// Up to `limit` layers evenly spaced from the first to the last.
    public static func keptLayers(_ layers: Int, limit: Int) -> [Int] {
        guard layers > limit, limit > 1 else { return Array(0..<min(layers, max(limit, 1))) }
        return (0..<limit).map { ($0 * (layers - 1) + (limit - 1) / 2) / (limit - 1) }
    }
}
