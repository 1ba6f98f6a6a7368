#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import Dispatch
import KVTierProtocol

extension KVTierClient {
    /// Writes one chunk (tokens `range`) in page layout into a buffer of exactly its size.
    typealias ChunkPacker = (_ range: Range<Int>, _ destination: UnsafeMutableRawBufferPointer) -> Void

    /// The body of both `put`s: sizes are checked already.
    func putChunks(_ model: RegisteredModel, tokens: [UInt32], session: String?, durable: Bool, pack: ChunkPacker) async throws -> Int {
        guard !tokens.isEmpty else { return 0 }
        guard tokens.count <= maxTokensPerRequest else {
            throw KVTierClientError.invalidArgument("\(tokens.count) tokens; a request carries at most \(maxTokensPerRequest)")
        }
        // One retry: pages cached at LOOKUP may be evicted before the PUT that builds on them.
        for attempt in 0..<2 {
            let cached = try await lookup(model, tokens: tokens).cachedTokens
            if cached == tokens.count && session == nil && !durable { return cached }
            let ranges = PageLayout.chunkRanges(dataStart: cached, tokenCount: tokens.count, pageTokens: model.pageTokens)
            let batches = try batches(of: ranges, model: model, tokens: tokens.count, session: session)
            var cachedAfter = cached
            for (index, batch) in batches.enumerated() {
                do {
                    cachedAfter = try await putBatch(model, tokens: tokens, batch: batch, dataStart: batch.first?.lowerBound ?? tokens.count,
                                                     session: session, durable: durable, pack: pack)
                } catch let error as KVTierClientError where attempt == 0 && index == 0 && error.wireError == .invalidArgument {
                    if try await lookup(model, tokens: tokens).cachedTokens < cached { break }
                    throw error
                }
                if index == batches.count - 1 { return cachedAfter }
            }
        }
        throw KVTierClientError.server(.invalidArgument, "the cached prefix shrank twice while putting; retry the put")
    }

    /// Groups chunks into `PUT`s: each within `maxExtents` chunks, and within `maxInlineBody`
    /// (inline) or a quarter of the staging arena (shared memory) in bytes. An empty group when there is
    /// nothing to send (a put that only names a session or asks for durability).
    private func batches(of ranges: [Range<Int>], model: RegisteredModel, tokens: Int, session: String?) throws -> [[Range<Int>]] {
        guard !ranges.isEmpty else { return [[]] }
        // PUT body without data: modelID, session, flags, tokens, dataStart, data length/count.
        let overhead = 8 + 2 + (session?.utf8.count ?? 0) + 1 + 4 + 4 * tokens + 4 + 8
        let budget = arena.map { max($0.stagingCapacity / 4, 1) } ?? (maxInlineBody - overhead)
        var batches: [[Range<Int>]] = []
        var current: [Range<Int>] = []
        var currentBytes = 0
        for range in ranges {
            let bytes = PageLayout.pageBytes(tokens: range.count, shape: model.shape)
            guard bytes <= budget else {
                throw KVTierClientError.invalidArgument("a page of \(bytes) bytes does not fit one \(arena == nil ? "inline PUT" : "staging ALLOC") "
                                                        + "(at most \(budget) bytes); use smaller pages\(arena == nil ? " or shared memory" : "")")
            }
            if !current.isEmpty && (currentBytes + bytes > budget || current.count == ProtocolLimits.maxExtents) {
                batches.append(current)
                current = []
                currentBytes = 0
            }
            current.append(range)
            currentBytes += bytes
        }
        batches.append(current)
        return batches
    }

    /// Packs each chunk into its staging extent. From `parallelPackBytes` on, chunks are packed
    /// by up to `packThreads` threads at once: the packing is the client's whole share of a large
    /// put, and one core's copy reaches about half the memory bandwidth two do.
    static func pack(_ batch: [Range<Int>], into destinations: [UnsafeMutableRawBufferPointer], total: Int, _ pack: ChunkPacker) {
        let threads = total < parallelPackBytes || batch.count < 2 ? 1 : min(packThreads, batch.count, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
        guard threads > 1 else {
            for (range, destination) in zip(batch, destinations) { pack(range, destination) }
            return
        }
        // Invariant for the unchecked box: a packer reads only its caller's key and value buffers
        // (valid for the whole call) and writes only the destination it is given; destinations
        // are disjoint extents, so packers of different chunks may run at once.
        withoutActuallyEscaping(pack) { pack in
            let shared = UncheckedPacking(pack: pack, batch: batch, destinations: destinations)
            DispatchQueue.concurrentPerform(iterations: threads) { thread in
                for index in stride(from: thread, to: shared.batch.count, by: threads) {
                    shared.pack(shared.batch[index], shared.destinations[index])
                }
            }
        }
    }

    /// From this many bytes a batch's chunks are packed by several threads.
    static let parallelPackBytes = 4 << 20
    /// Most threads packing one batch.
    static let packThreads = 4

    /// One `PUT` of `batch`'s chunks (tokens up to the batch's end), staged in the arena or
    /// inline. Returns the cached token count the daemon reports.
    private func putBatch(
        _ model: RegisteredModel, tokens: [UInt32], batch: [Range<Int>], dataStart: Int, session: String?, durable: Bool, pack: ChunkPacker
    ) async throws -> Int {
        let end = batch.last?.upperBound ?? tokens.count
        let prefix = end == tokens.count ? tokens : Array(tokens[0..<end])
        let sizes = batch.map { PageLayout.pageBytes(tokens: $0.count, shape: model.shape) }
        func send(_ data: PageData) async throws -> Int {
            let request = Put(modelID: model.modelID, session: session ?? "", durable: durable, tokens: prefix,
                              dataStart: UInt32(dataStart), data: data)
            let reply = try await call(.put(request), expecting: "PUT") { if case .put(let r) = $0 { r } else { nil } }
            guard Int(reply.cachedTokens) <= prefix.count else {
                throw KVTierClientError.protocolViolation("PUT of \(prefix.count) tokens says \(reply.cachedTokens) are cached")
            }
            return Int(reply.cachedTokens)
        }

        guard let arena else {
            var bytes = [UInt8](repeating: 0, count: sizes.reduce(0, +))
            bytes.withUnsafeMutableBytes { buffer in
                var at = 0
                for (range, size) in zip(batch, sizes) {
                    pack(range, UnsafeMutableRawBufferPointer(rebasing: buffer[at..<at + size]))
                    at += size
                }
            }
            return try await send(.inline(bytes))
        }
        guard !batch.isEmpty else { return try await send(.extents([])) }

        let staging = try await call(.alloc(Alloc(byteCounts: sizes.map { UInt64($0) })), expecting: "ALLOC") {
            if case .alloc(let r) = $0 { r } else { nil }
        }
        do {
            guard staging.extents.count == batch.count else {
                throw KVTierClientError.protocolViolation("ALLOC of \(batch.count) extents returned \(staging.extents.count)")
            }
            var extents: [WireExtent] = []
            var destinations: [UnsafeMutableRawBufferPointer] = []
            for (index, extent) in staging.extents.enumerated() {
                guard let destination = arena.stagingBytes(offset: extent.offset, length: extent.bytes), destination.count >= sizes[index] else {
                    throw KVTierClientError.protocolViolation("ALLOC extent at \(extent.offset) of \(extent.bytes) bytes is outside the staging arena "
                                                              + "or shorter than the \(sizes[index]) bytes asked for")
                }
                destinations.append(UnsafeMutableRawBufferPointer(rebasing: destination[0..<sizes[index]]))
                extents.append(WireExtent(offset: extent.offset, bytes: extent.bytes, tokens: UInt32(batch[index].count)))
            }
            // Chunks are packed on several threads: extents that overlap would be written by two at
            // once. A daemon never hands such out; one that does is not followed.
            let sorted = staging.extents.sorted { $0.offset < $1.offset }
            if let overlap = zip(sorted, sorted.dropFirst()).first(where: { $0.offset &+ $0.bytes > $1.offset }) {
                throw KVTierClientError.protocolViolation("ALLOC returned overlapping extents (at \(overlap.0.offset) and \(overlap.1.offset))")
            }
            Self.pack(batch, into: destinations, total: sizes.reduce(0, +), pack)
            // PUT consumed every extent of the lease, which ended it (docs/protocol.md, ALLOC):
            // nothing to release.
            return try await send(.extents(extents))
        } catch {
            try? await release(leaseID: staging.leaseID)
            throw error
        }
    }
}

/// What `KVTierClient.pack` hands its threads (see the invariant there).
private struct UncheckedPacking: @unchecked Sendable {
    let pack: KVTierClient.ChunkPacker
    let batch: [Range<Int>]
    let destinations: [UnsafeMutableRawBufferPointer]
}
