#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import KVTierClient
import KVTierCore

/// What prefetch on session resume buys (`kvtier bench resume`): time from a conversation's
/// next request to its restored KV, with the session's pages on disk, when the client resumes the
/// session as the request arrives (SESSION_TOKENS starts the prefetch) and GETs after its own
/// work of `thinkMillis` (tokenizing the new turn, scheduling), against the same GET with no
/// resume first (a cold GET from disk, the baseline, measured in the same run).
///
/// Before every measurement all pages leave RAM (EVICT) and the page files leave the OS page
/// cache (`posix_fadvise(DONTNEED)`), so both paths read the disk.
public struct ResumeBenchmark: Sendable {
    public struct Options: Sendable {
        public var sessions = 4
        public var tokensPerSession = 4096
        public var layers = 8
        public var kvHeads = 8
        public var headDim = 128
        public var diskCodec = "k4v4"
        public var thinkMillis: [Double] = [0, 5, 20]
        public var rounds = 3
        public var daemonPath: String
        public init(daemonPath: String) { self.daemonPath = daemonPath }
    }

    public struct Row: Sendable, Encodable {
        public var thinkMillis: Double
        /// Think time, then a GET of pages on disk: the median over sessions and rounds.
        public var coldMillis: Double
        /// Resume, think, then the GET: the median.
        public var prefetchedMillis: Double
        /// Just the GET, in each case.
        public var coldGetMillis: Double
        public var prefetchedGetMillis: Double
        public var speedup: Double
    }

    public struct Report: Sendable, Encodable {
        public var sessions: Int
        public var tokensPerSession: Int
        /// fp16 bytes of one session's KV.
        public var sessionBytes: Int
        public var modelShape: String
        public var diskCodec: String
        public var rounds: Int
        public var rows: [Row]
        /// The daemon's prefetch counters after the run.
        public var prefetchLoaded: UInt64
        public var prefetchUseful: UInt64
        public var cpuCores: Int
    }

    public let options: Options
    let note: @Sendable (String) -> Void

    public init(options: Options, note: @escaping @Sendable (String) -> Void = { _ in }) {
        self.options = options
        self.note = note
    }

    public func run() async throws -> Report {
        let o = options
        guard o.sessions >= 1, o.tokensPerSession >= 1, o.rounds >= 1, !o.thinkMillis.isEmpty else {
            throw ToolError("sessions, tokens per session and rounds must be at least 1, with at least one think time")
        }
        guard access(o.daemonPath, X_OK) == 0 else { throw ToolError("no kvtierd at \(o.daemonPath): build it or pass --daemon PATH") }
        let spec = ModelSpecification(name: "resume-bench", layers: o.layers, kvHeads: o.kvHeads, headDim: o.headDim,
                                      elementType: .float16, ropeTheta: 500_000)
        let sessionBytes = spec.shape.elements(tokens: o.tokensPerSession) * 4
        let scratch = try makeScratchDirectory(prefix: "kvtier-resume-")
        defer { removeTree(scratch) }
        let socket = scratch + "/kvtierd.sock", log = scratch + "/kvtierd.log"
        // Room for every session twice over: RAM pressure is not what this measures.
        let ramBudget = 2 * o.sessions * sessionBytes + (64 << 20)
        let daemon = try ServeChild(
            name: "kvtierd", executable: o.daemonPath,
            arguments: ["--socket", socket, "--state-dir", scratch + "/state", "--ram-budget", "\(ramBudget >> 20)MiB",
                        "--disk-codec", o.diskCodec, "--log-level", "warning"],
            pipes: false, logPath: log)
        defer { daemon.terminate() }
        let client = try await connectWhenServing(daemon, socket: socket, log: log, clientName: "bench-resume")
        defer { Task { [client] in await client.close() } }
        let model = try await client.registerModel(spec)

        note("putting \(o.sessions) sessions of \(o.tokensPerSession) tokens (\(ByteCount(sessionBytes)) each)")
        var sequences: [[UInt32]] = []
        var random = SplitMix64(seed: 0x7E5)
        for index in 0..<o.sessions {
            let tokens = (0..<o.tokensPerSession).map { _ in UInt32.random(in: 0..<128_000, using: &random) }
            let elements = spec.shape.elements(tokens: tokens.count)
            // Finite float16 values in [-2, 2): exponent bits below 0x4000.
            let keys = (0..<elements).map { _ in UInt16.random(in: 0..<0x4000, using: &random) | (random.next() & 1 == 0 ? 0 : 0x8000) }
            let values = (0..<elements).map { _ in UInt16.random(in: 0..<0x4000, using: &random) | (random.next() & 1 == 0 ? 0 : 0x8000) }
            _ = try await client.put(model, tokens: tokens, keys: keys, values: values, session: "resume-\(index)")
            sequences.append(tokens)
        }

        let sink = UnsafeMutableRawBufferPointer.allocate(byteCount: sessionBytes, alignment: 64)
        defer { sink.deallocate() }
        var rows: [Row] = []
        for think in o.thinkMillis {
            var cold: [Double] = [], prefetched: [Double] = [], coldGet: [Double] = [], prefetchedGet: [Double] = []
            for _ in 0..<o.rounds {
                for (index, tokens) in sequences.enumerated() {
                    try await coolDown(client, scratch + "/state/store")
                    let start = Clocks.monotonicNanoseconds()
                    try await Self.sleep(millis: think)
                    let getStart = Clocks.monotonicNanoseconds()
                    try await Self.get(client, model, tokens, into: sink)
                    let end = Clocks.monotonicNanoseconds()
                    cold.append(Double(end - start) / 1e6)
                    coldGet.append(Double(end - getStart) / 1e6)

                    try await coolDown(client, scratch + "/state/store")
                    let arrival = Clocks.monotonicNanoseconds()
                    _ = try await client.sessionTokens("resume-\(index)")
                    try await Self.sleep(millis: think)
                    let getAfter = Clocks.monotonicNanoseconds()
                    try await Self.get(client, model, tokens, into: sink)
                    let done = Clocks.monotonicNanoseconds()
                    prefetched.append(Double(done - arrival) / 1e6)
                    prefetchedGet.append(Double(done - getAfter) / 1e6)
                }
            }
            let row = Row(thinkMillis: think, coldMillis: Self.median(cold), prefetchedMillis: Self.median(prefetched),
                          coldGetMillis: Self.median(coldGet), prefetchedGetMillis: Self.median(prefetchedGet),
                          speedup: Self.median(cold) / Self.median(prefetched))
            note("think \(think) ms: cold \(row.coldMillis) ms, resumed \(row.prefetchedMillis) ms")
            rows.append(row)
        }
        let status = try await client.status()
        return Report(sessions: o.sessions, tokensPerSession: o.tokensPerSession, sessionBytes: sessionBytes,
                      modelShape: "\(o.layers)×[tokens, \(o.kvHeads), \(o.headDim)] float16", diskCodec: o.diskCodec, rounds: o.rounds,
                      rows: rows, prefetchLoaded: status["prefetch_loaded"] ?? 0, prefetchUseful: status["prefetch_useful"] ?? 0,
                      cpuCores: Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
    }

    /// Every page out of RAM, and the page files out of the OS page cache.
    func coolDown(_ client: KVTierClient, _ store: String) async throws {
        _ = try await client.evictAll()
        guard let directory = opendir(store) else { return }
        defer { closedir(directory) }
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard name.hasSuffix(".kvs") else { continue }
            let descriptor = open(store + "/" + name, O_RDONLY)
            guard descriptor >= 0 else { continue }
            _ = posix_fadvise(descriptor, 0, 0, POSIX_FADV_DONTNEED)
            close(descriptor)
        }
    }

    /// A GET of the whole session, every page copied out (as a client moving it to the GPU would read it).
    static func get(_ client: KVTierClient, _ model: RegisteredModel, _ tokens: [UInt32], into sink: UnsafeMutableRawBufferPointer) async throws {
        let served = try await client.withLeasedPages(model, tokens: tokens) { leased -> Int in
            var at = 0
            for page in leased.pages {
                let n = min(page.bytes.count, sink.count - at)
                UnsafeMutableRawBufferPointer(rebasing: sink[at..<at + n]).copyMemory(from: UnsafeRawBufferPointer(rebasing: page.bytes[0..<n]))
                at += n
            }
            return leased.tokens
        }
        guard served == tokens.count else { throw ToolError("the GET served \(served) of \(tokens.count) tokens: the session's pages are gone") }
    }

    static func sleep(millis: Double) async throws {
        guard millis > 0 else { return }
        try await Task.sleep(for: .microseconds(Int(millis * 1000)))
    }

    static func median(_ values: [Double]) -> Double {
        let sorted = values.sorted()
        return sorted.isEmpty ? 0 : sorted[sorted.count / 2]
    }
}
