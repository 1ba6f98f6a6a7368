import KVTierCore
import KVTierProtocol

extension KVTierClient {
    /// Stores the KV of `tokens`, sending only what is not cached yet: a `LOOKUP` finds the
    /// cached prefix, then the rest goes in page-layout chunks through the shared arena (`ALLOC`,
    /// write, `PUT` with extents) or inline (several `PUT`s when one would pass `maxInlineBody`).
    /// - Parameters:
    ///   - keys, values: `[layers, tokens.count, kvHeads, headDim]` 16-bit elements each, for all
    ///     of `tokens` (the cached part is not read). Must stay valid until the call returns.
    ///   - session: the session to extend, or nil.
    ///   - durable: reply only once the pages are on disk.
    /// - Returns: tokens cached after the put.
    @discardableResult
    public func put(
        _ model: RegisteredModel, tokens: [UInt32], keys: UnsafeRawBufferPointer, values: UnsafeRawBufferPointer,
        session: String? = nil, durable: Bool = false
    ) async throws -> Int {
        try checkSizes(model, tokens: tokens.count, keys: keys.count, values: values.count)
        return try await putChunks(model, tokens: tokens, session: session, durable: durable) { range, destination in
            PageLayout.pack(shape: model.shape, sequenceTokens: tokens.count, range: range, keys: keys, values: values, into: destination)
        }
    }

    /// `put` with keys and values as arrays of 16-bit bit patterns.
    @discardableResult
    public func put(
        _ model: RegisteredModel, tokens: [UInt32], keys: [UInt16], values: [UInt16], session: String? = nil, durable: Bool = false
    ) async throws -> Int {
        try checkSizes(model, tokens: tokens.count, keys: keys.count * 2, values: values.count * 2)
        return try await putChunks(model, tokens: tokens, session: session, durable: durable) { range, destination in
            keys.withUnsafeBytes { keys in
                values.withUnsafeBytes { values in
                    PageLayout.pack(shape: model.shape, sequenceTokens: tokens.count, range: range, keys: keys, values: values, into: destination)
                }
            }
        }
    }

    /// The cached prefix of `tokens` (at most `maxTokens` of it; 0: all), copied into keys and
    /// values arrays `[layers, served, kvHeads, headDim]`; the lease is released afterwards.
    public func get(_ model: RegisteredModel, tokens: [UInt32], maxTokens: Int = 0) async throws -> CachedKV {
        try await withLeasedPages(model, tokens: tokens, maxTokens: maxTokens) { leased in
            let shape = leased.shape
            var keys = [UInt16](repeating: 0, count: shape.elements(tokens: leased.tokens))
            var values = keys
            keys.withUnsafeMutableBytes { keys in
                values.withUnsafeMutableBytes { values in
                    for page in leased.pages {
                        PageLayout.unpack(shape: shape, page: page.bytes, pageTokens: page.holdsTokens, usedTokens: page.servedTokens.count,
                                          sequenceTokens: leased.tokens, start: page.servedTokens.lowerBound, keys: keys, values: values)
                    }
                }
            }
            return CachedKV(tokens: leased.tokens, keys: keys, values: values)
        }
    }

    /// `GET`s the cached prefix and lends its pages without copying (from the shared arena, or
    /// from the reply when inline), then releases the lease, whether `body` returns or throws.
    /// The pages' bytes are valid only inside `body`. The `RELEASE` goes out without waiting
    /// for its reply (the next call reads it): the daemon answers in order, so every later call
    /// sees the lease ended.
    public func withLeasedPages<R>(
        _ model: RegisteredModel, tokens: [UInt32], maxTokens: Int = 0, _ body: (LeasedPages) async throws -> R
    ) async throws -> R {
        guard let limit = UInt32(exactly: maxTokens) else { throw KVTierClientError.invalidArgument("maxTokens \(maxTokens) is not a u32") }
        let inline = arena == nil
        let reply = try await call(.get(Get(modelID: model.modelID, tokens: tokens, maxTokens: limit, inline: inline)),
                                   getInline: inline, expecting: "GET") { if case .get(let r) = $0 { r } else { nil } }
        // Inline pages are lent from an owned copy: an array's storage may not be lent across
        // suspension points.
        var inlineCopy: UnsafeMutableRawBufferPointer?
        if case .inline(let bytes) = reply.data {
            let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: max(bytes.count, 1), alignment: 16)
            bytes.withUnsafeBytes { copy.copyMemory(from: $0) }
            inlineCopy = copy
        }
        defer { inlineCopy?.deallocate() }
        let result: R
        do {
            // Extents point into `arena`, which `self` keeps mapped for the whole call.
            let leased = try leasedPages(reply, inlineBytes: inlineCopy.map { UnsafeRawBufferPointer($0) },
                                         model: model, requested: tokens.count, maxTokens: maxTokens)
            result = try await body(leased)
        } catch {
            await releaseWithoutWaiting(reply)
            throw error
        }
        await releaseWithoutWaiting(reply)
        return result
    }

    /// Ends a `GET`'s lease without waiting for the reply. Closing the connection also ends the
    /// lease, so a failed release loses nothing; an inline reply holds no lease (its id is 0).
    private func releaseWithoutWaiting(_ reply: GetReply) async {
        guard reply.leaseID != 0 else { return }
        try? await transport.sendWithoutWaiting(.release(Release(leaseID: reply.leaseID)))
    }

    /// The pages of a `GET` reply, every extent and count checked against the arena and the shape.
    private func leasedPages(
        _ reply: GetReply, inlineBytes: UnsafeRawBufferPointer?, model: RegisteredModel, requested: Int, maxTokens: Int
    ) throws -> LeasedPages {
        let served = Int(reply.tokens)
        guard served <= requested, maxTokens == 0 || served <= maxTokens else {
            throw KVTierClientError.protocolViolation("GET served \(served) tokens of \(requested) (at most \(maxTokens))")
        }
        let bytesPerToken = model.shape.bytesPerToken
        var pages: [LeasedPage] = []
        var start = 0
        func add(_ bytes: UnsafeRawBufferPointer, holds: Int, offset: Int?) throws {
            guard holds > 0, start < served else {
                throw KVTierClientError.protocolViolation("GET sent a page of \(holds) tokens at token \(start) of \(served) served")
            }
            pages.append(LeasedPage(bytes: bytes, holdsTokens: holds, servedTokens: start..<min(start + holds, served), arenaOffset: offset))
            start += holds
        }
        switch reply.data {
        case .extents(let extents):
            guard let arena else { throw KVTierClientError.protocolViolation("GET answered an inline request with extents") }
            for extent in extents {
                let holds = Int(extent.tokens)
                guard let bytes = arena.pageBytes(offset: extent.offset, length: extent.bytes), holds * bytesPerToken <= bytes.count else {
                    throw KVTierClientError.protocolViolation("GET extent at \(extent.offset) of \(extent.bytes) bytes, \(extent.tokens) tokens, "
                                                              + "does not fit the arena or the model's \(bytesPerToken) bytes per token")
                }
                try add(UnsafeRawBufferPointer(rebasing: bytes[0..<holds * bytesPerToken]), holds: holds, offset: Int(extent.offset))
            }
        case .inline(let bytes):
            // Inline pages come one after another: whole pages, the last possibly shorter.
            guard bytes.count % bytesPerToken == 0 else {
                throw KVTierClientError.protocolViolation("GET sent \(bytes.count) inline bytes, not whole tokens of \(bytesPerToken) bytes")
            }
            guard let raw = inlineBytes else { throw KVTierClientError.protocolViolation("GET answered a shared-memory request inline") }
            var held = bytes.count / bytesPerToken
            while held > 0 {
                let holds = min(held, model.pageTokens)
                let at = start * bytesPerToken
                try add(UnsafeRawBufferPointer(rebasing: raw[at..<at + holds * bytesPerToken]), holds: holds, offset: nil)
                held -= holds
            }
        }
        guard start >= served else {
            throw KVTierClientError.protocolViolation("GET served \(served) tokens but its pages hold \(start)")
        }
        return LeasedPages(tokens: served, pages: pages, shape: model.shape)
    }

    private func checkSizes(_ model: RegisteredModel, tokens: Int, keys: Int, values: Int) throws {
        let expected = model.shape.elements(tokens: tokens) * ModelShape.elementBytes
        guard keys == expected, values == expected else {
            throw KVTierClientError.invalidArgument("keys and values must be [layers, tokens, kvHeads, headDim] 16-bit elements: "
                                                    + "\(expected) bytes each for \(tokens) tokens, got \(keys) and \(values)")
        }
    }
}
