import KVTierCodec
import KVTierCore
import KVTierProtocol
import KVTierServer
import KVTierStore

/// The daemon's request semantics: wire requests onto the tiered store, and the `VRAM_*`
/// requests onto the VRAM tier's directory (StoreRequestHandler+Vram).
public struct StoreRequestHandler: RequestHandler {
    let store: TieredStore
    let defaultPageTokens: Int
    let vram: VramDirectory

    /// `vram`: the VRAM tier's directory; by default a new one whose heat decays as the store's.
    public init(store: TieredStore, defaultPageTokens: Int, vram: VramDirectory? = nil) {
        self.store = store
        self.defaultPageTokens = defaultPageTokens
        self.vram = vram ?? VramDirectory(heatHalfLifeMicros: store.heatHalfLifeMicros)
    }

    /// Plans each request once: the store answers at once when nothing has to wait (a `GET` of
    /// RAM pages, a `PUT` of whole pages into RAM with room, listings, lookups), and otherwise
    /// hands back the rest of the work (disk reads, eviction, durability), which runs as a task.
    public func handle(_ request: Request, context: ConnectionContext) -> Handling {
        do {
            return try plan(request, context)
        } catch {
            return .reply(.failure(Self.wireError(error), error.description, to: request))
        }
    }

    public func connectionClosed(_ context: ConnectionContext) async {
        vram.connectionClosed(owner: context.connectionID)
        store.releaseAll(owner: context.connectionID)
    }

    static func wireError(_ error: StoreError) -> WireError {
        switch error {
        case .unknownModel, .notFound: .notFound
        case .invalidArgument: .invalidArgument
        case .overBudget: .overBudget
        case .unavailable: .unavailable
        }
    }

    private func plan(_ request: Request, _ context: ConnectionContext) throws(StoreError) -> Handling {
        let tenant = context.tenant
        switch request {
        case .hello, .ping:
            throw .invalidArgument("HELLO and PING are answered by the server")
        case .registerModel(let r):
            let pageTokens = r.pageTokens == 0 ? UInt16(clamping: defaultPageTokens) : r.pageTokens
            var canonical = r
            let codec = try Self.diskCodec(named: r.diskCodec ?? "")
            canonical.diskCodec = codec?.name
            let id: UInt64
            do { id = try canonical.modelID(pageTokensInForce: pageTokens) } catch { throw .invalidArgument("\(error)") }
            try store.register(ModelSpec(id: id, name: r.name, shape: r.shape, pageTokens: Int(pageTokens), ropeTheta: r.ropeTheta,
                                         diskCodec: codec), for: tenant)
            return .reply(.registerModel(RegisterModelReply(modelID: id, pageTokens: pageTokens)))
        case .lookup(let r):
            return .reply(try lookup(r, context))
        case .put(let r):
            let chunks = try chunks(of: r, tenant: tenant)
            let outcome = try store.beginPut(tenant, owner: context.connectionID, modelID: r.modelID, tokens: r.tokens,
                                             dataStart: Int(r.dataStart), chunks: chunks, durable: r.durable,
                                             session: r.session.isEmpty ? nil : r.session)
            return finish(outcome, request) { result throws(StoreError) in
                .put(PutReply(cachedTokens: UInt32(result.cachedTokens), newPages: UInt32(result.newPages)))
            }
        case .get(let r):
            guard r.inline || context.sharedMemory else {
                throw .invalidArgument("this connection has no shared memory: send GET with the inline flag")
            }
            let model = try store.model(r.modelID)
            let outcome: TieredStore.Outcome<TieredStore.GetResult>
            if let pages = r.pages {
                // Inline: the leading pages that fit one reply; the client asks again for the rest.
                let fitting = r.inline ? Self.inlineLimit(model, requested: 0) / model.pageTokens : pages.count
                outcome = try store.beginGetPages(tenant, owner: context.connectionID, modelID: r.modelID, tokens: r.tokens,
                                                  pages: pages.prefix(fitting).map { Int($0) })
            } else {
                let maxTokens = r.inline ? Self.inlineLimit(model, requested: r.maxTokens) : Int(r.maxTokens)
                outcome = try store.beginGet(tenant, owner: context.connectionID, modelID: r.modelID, tokens: r.tokens, maxTokens: maxTokens)
            }
            return finish(outcome, request) { [self] got throws(StoreError) in try getReply(got, model, inline: r.inline, context) }
        case .release(let r):
            return .reply(try release(r, context))
        case .alloc(let r):
            return .reply(try alloc(r, context))
        case .attention(let r):
            try store.reportAttention(tenant, modelID: r.modelID, tokens: r.tokens, masses: r.pageMass)
            return .reply(.attention)
        case .querySample(let r):
            try store.codecPolicy.report(queries: r.elements, layers: Int(r.layers), queryHeads: Int(r.queryHeads), headDim: Int(r.headDim),
                                         count: Int(r.count), model: store.model(r.modelID), tenant: tenant)
            return .reply(.querySample)
        case .status:
            return .reply(.status(StatusReply(counters: (store.status() + vram.status()).map { StatusCounter(name: $0.name, value: $0.value) })))
        case .models(let r):
            return .reply(models(r, context))
        case .codecs(let r):
            return .reply(codecs(r, context))
        case .pages(let r):
            let all = store.pageSummaries(tenant, modelID: r.modelID == 0 ? nil : r.modelID)
            let start = min(all.count, Int(r.offset))
            let end = min(all.count, start + Int(r.limit))
            return .reply(.pages(PagesReply(total: UInt32(clamping: all.count), pages: all[start..<end].map(Self.info))))
        case .evict(let r):
            if !r.session.isEmpty {
                guard r.modelID == 0, r.tokens.isEmpty, !r.everyPage else {
                    throw .invalidArgument("EVICT names session '\(r.session)' and also a model, tokens or every page: name one selection")
                }
            }
            return finish(.pending { [store] () async throws(StoreError) -> TieredStore.EvictResult in
                if r.session.isEmpty {
                    return try await store.evict(tenant, modelID: r.modelID == 0 ? nil : r.modelID, tokens: r.everyPage ? nil : r.tokens,
                                                 deleteFromDisk: r.deleteFromDisk)
                }
                return try await store.evictSession(tenant, name: r.session, deleteFromDisk: r.deleteFromDisk)
            }, request) { result throws(StoreError) in
                .evict(EvictReply(evicted: UInt32(clamping: result.evicted), deleted: UInt32(clamping: result.deleted),
                                  skipped: UInt32(clamping: result.skipped)))
            }
        case .sessionList(let r):
            return .reply(sessionList(r, context))
        case .sessionInfo(let r):
            return .reply(.sessionInfo(Self.info(try store.sessionDetail(tenant, name: r.name))))
        case .sessionPin(let r):
            _ = try store.setSessionPinned(tenant, name: r.name, pinned: r.pinned)
            return .reply(.sessionPin)
        case .sessionTTL(let r):
            try store.setSessionTTL(tenant, name: r.name, seconds: r.seconds)
            return .reply(.sessionTTL)
        case .sessionFork(let r):
            return .reply(.sessionFork(Self.info(try store.forkSession(tenant, from: r.from, to: r.to))))
        case .sessionDelete(let r):
            try store.deleteSession(tenant, name: r.name)
            return .reply(.sessionDelete)
        case .sessionTokens(let r):
            // The client is resuming the session: its disk pages start loading now.
            let resumed = try store.resumeSession(tenant, name: r.name)
            return .reply(.sessionTokens(SessionTokensReply(modelID: resumed.session.modelID, tokens: resumed.session.tokens)))
        case .vramPool(let r):
            return .reply(try vramPool(r, context))
        case .vramPlace(let r):
            return .reply(try vramPlace(r, context))
        case .vramCommit(let r):
            try vram.commit(tenant, owner: context.connectionID, leaseID: r.leaseID)
            return .reply(.vramCommit)
        case .vramLease(let r):
            return .reply(try vramLease(r, context))
        case .vramDrop(let r):
            let readers = try vram.retire(tenant, owner: context.connectionID, poolID: r.poolID)
            return .reply(.vramDrop(VramDropReply(readers: UInt32(clamping: readers))))
        }
    }

    /// The reply to a store outcome: now when it is done, after its pending work otherwise
    /// (store errors of either become error replies).
    private func finish<Value>(_ outcome: TieredStore.Outcome<Value>, _ request: Request,
                               _ reply: @escaping @Sendable (Value) throws(StoreError) -> Reply) -> Handling {
        switch outcome {
        case .done(let value):
            do { return .reply(try reply(value)) } catch { return .reply(.failure(Self.wireError(error), error.description, to: request)) }
        case .pending(let rest):
            return .pending {
                do throws(StoreError) {
                    return try reply(try await rest())
                } catch {
                    return .failure(Self.wireError(error), error.description, to: request)
                }
            }
        }
    }

    /// The codec a `REGISTER_MODEL` names (nil for none: the configured `diskCodec`).
    static func diskCodec(named name: String) throws(StoreError) -> Codec? {
        guard !name.isEmpty else { return nil }
        do { return try Codec(name: name) } catch {
            throw .invalidArgument("disk codec \(String(name.prefix(64)).debugDescription) is not a codec name; use one of \(Codec.all.map(\.name).joined(separator: ", ")) (zstd also as zstd(N), N 1-19), or send none for the daemon's diskCodec")
        }
    }

    /// The most tokens an inline GET reply serves: whole pages that fit one frame (0: all).
    static func inlineLimit(_ model: ModelSpec, requested: UInt32) -> Int {
        let pageBytes = model.pageTokens * model.bytesPerToken
        let fitting = max(1, (ProtocolLimits.maxInlineBody - 64) / max(1, pageBytes)) * model.pageTokens
        return requested == 0 ? fitting : min(Int(requested), fitting)
    }

    /// The reply to a GET whose pages `got` leased: their extents, or inline their bytes copied
    /// out of the arena, after which the lease ends.
    func getReply(_ got: TieredStore.GetResult, _ model: ModelSpec, inline: Bool, _ context: ConnectionContext) throws(StoreError) -> Reply {
        guard inline else {
            return .get(GetReply(tokens: UInt32(got.tokens), leaseID: got.leaseID, data: .extents(got.pages.map {
                WireExtent(offset: UInt64($0.extent.offset), bytes: UInt64($0.extent.length), tokens: UInt32($0.tokens))
            })))
        }
        let memory = try store.memory(for: context.tenant)
        let total = got.pages.reduce(0) { $0 + $1.tokens * model.bytesPerToken }
        let bytes = [UInt8](unsafeUninitializedCapacity: total) { buffer, count in
            var at = 0
            for page in got.pages {
                let length = page.tokens * model.bytesPerToken
                UnsafeMutableRawBufferPointer(rebasing: UnsafeMutableRawBufferPointer(buffer)[at..<at + length])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: memory.buffer(page.extent).readOnly[0..<length]))
                at += length
            }
            count = at
        }
        try store.release(context.tenant, leaseID: got.leaseID)
        return .get(GetReply(tokens: UInt32(got.tokens), leaseID: 0, data: .inline(bytes)))
    }

    /// One page of the tenant's models: only the asking tenant's (another tenant's model names
    /// are its own).
    func models(_ r: ListPage, _ context: ConnectionContext) -> Reply {
        let models = store.models(of: context.tenant)
        let page = models[r.range(in: models.count)].map { m in
            // Registered models passed the store's limits, which fit the wire's 16-bit fields.
            ModelEntry(modelID: m.id, registration: try! RegisterModel(name: m.name, shape: m.shape, pageTokens: m.pageTokens,
                                                                       ropeTheta: m.ropeTheta, diskCodec: m.diskCodec?.name))
        }
        return .models(ModelsReply(total: UInt32(clamping: models.count), models: page))
    }

    /// The disk codec of each of the tenant's models, as the codec policy decided it for this
    /// tenant, by model id.
    func codecs(_ r: ListPage, _ context: ConnectionContext) -> Reply {
        let models = store.models(of: context.tenant)
        let page = models[r.range(in: models.count)].map { m in
            Self.info(store.codecPolicy.choice(for: m, tenant: context.tenant))
        }
        return .codecs(CodecsReply(total: UInt32(clamping: models.count), choices: page))
    }

    static func info(_ c: CodecPolicy.Choice) -> CodecChoiceInfo {
        let phase: CodecChoiceInfo.Phase = switch c.phase {
        case .fixed: .fixed
        case .measuring: .measuring
        case .chosen: .chosen
        case .fellBack: .fellBack
        }
        return CodecChoiceInfo(modelID: c.modelID, phase: phase, queriesFromKeys: c.queriesFrom == "keys", codecTag: c.codec.tag,
                               attentionError: Float(c.attentionError ?? .nan), maxAttentionError: Float(c.maxAttentionError),
                               lastCheckError: Float(c.lastCheckError ?? .nan), checks: UInt32(clamping: c.checks),
                               fallbacks: UInt32(clamping: c.fallbacks), sampledTokens: UInt32(clamping: c.sampledTokens),
                               sampledLayers: UInt16(clamping: c.sampledLayers), message: c.message)
    }

    /// One page of the tenant's sessions, most recently used first. No page of any session is
    /// looked at (that is SESSION_INFO's), so a reply costs a sort of the tenant's sessions at
    /// most, and holds no lock meanwhile.
    func sessionList(_ r: ListPage, _ context: ConnectionContext) -> Reply {
        let (total, sessions) = store.sessionList(context.tenant, offset: Int(r.offset), limit: Int(r.limit))
        return .sessionList(SessionListReply(total: UInt32(clamping: total), sessions: sessions.map { s in
            SessionEntry(name: s.name, modelID: s.modelID, tokens: UInt32(clamping: s.tokens.count), pinned: s.pinned,
                         ttlSeconds: s.ttlSeconds, lastUsedMicros: s.lastUsedMicros)
        }))
    }

    func lookup(_ r: Lookup, _ context: ConnectionContext) throws(StoreError) -> Reply {
        let found = try store.lookup(context.tenant, modelID: r.modelID, tokens: r.tokens)
        // The wire has no remote field: remote tokens, like disk tokens, are tokens a GET loads
        // from outside RAM (and the load estimate prices them at the remote tier's speed).
        return .lookup(LookupReply(cachedTokens: UInt32(found.cachedTokens), ramTokens: UInt32(found.ramTokens),
                                   diskTokens: UInt32(found.diskTokens + found.remoteTokens), estimatedLoadMicros: found.estimatedLoadMicros,
                                   vramTokens: UInt32(vram.residentTokens(context.tenant, Self.vramPages(found.pages)))))
    }

    func release(_ r: Release, _ context: ConnectionContext) throws(StoreError) -> Reply {
        // The directory's lease ids never collide with the store's (VramDirectory.firstLeaseID),
        // so a GET's RELEASE does not take the directory's lock.
        if r.leaseID >= VramDirectory.firstLeaseID, vram.release(context.tenant, leaseID: r.leaseID) { return .release }
        try store.release(context.tenant, leaseID: r.leaseID)
        return .release
    }

    func alloc(_ r: Alloc, _ context: ConnectionContext) throws(StoreError) -> Reply {
        let stagingBytes = r.byteCounts.isEmpty ? 0 : try store.memory(for: context.tenant).stagingCapacity
        var sizes: [Int] = []
        sizes.reserveCapacity(r.byteCounts.count)
        for (index, size) in r.byteCounts.enumerated() {
            // Checked here, before any arithmetic: a u64 from the wire may not fit an Int.
            guard size >= 1, size <= UInt64(stagingBytes) else {
                throw .invalidArgument("ALLOC size \(index) is \(size) bytes; each must be 1 to \(stagingBytes), the tenant's staging arena (stagingSize)")
            }
            sizes.append(Int(size))
        }
        let (lease, extents) = try store.allocate(context.tenant, owner: context.connectionID, sizes: sizes)
        return .alloc(AllocReply(leaseID: lease, extents: extents.map { WireExtent(offset: UInt64($0.offset), bytes: UInt64($0.length), tokens: 0) }))
    }

    static func info(_ page: TieredStore.PageSummary) -> PageInfo {
        var tiers: PageInfo.Tiers = []
        if page.inRAM { tiers.insert(.ram) }
        if page.onDisk { tiers.insert(.disk) }
        let hold: UInt8 = switch page.hold {
        case .none: 0
        case .session: 1
        case .pinned: 2
        }
        return PageInfo(key: page.address.key, modelID: page.modelID, tokens: UInt32(clamping: page.tokens), tiers: tiers, hold: hold,
                        leases: UInt16(clamping: page.leases), heat: Float(page.heat), codecTag: page.diskCodec?.tag ?? 0,
                        storedBytes: UInt32(clamping: page.storedBytes), rawBytes: UInt32(clamping: page.rawBytes), idleMicros: page.idleMicros)
    }

    static func info(_ detail: TieredStore.SessionDetail) -> SessionInfo {
        let s = detail.session
        return SessionInfo(name: s.name, modelID: s.modelID, tokens: UInt32(s.tokens.count), pinned: s.pinned, ttlSeconds: s.ttlSeconds,
                           lastUsedMicros: s.lastUsedMicros, ramTokens: UInt32(detail.ramTokens), diskTokens: UInt32(detail.diskTokens))
    }

    /// A wire extent as the store's `Extent`, once it is known to lie inside the tenant's staging arena:
    /// offsets and lengths come off the wire as u64, and every later step (the store's byte
    /// accounting, `Extent.end`, the arena's bounds) does Int arithmetic on them.
    static func stagingExtent(_ extent: WireExtent, index: Int, stagingBytes: Int) throws(StoreError) -> Extent {
        guard let offset = Int(exactly: extent.offset), let length = Int(exactly: extent.bytes),
              length >= 1, offset <= stagingBytes, length <= stagingBytes - offset else {
            throw .invalidArgument("PUT extent \(index) (offset \(extent.offset), \(extent.bytes) bytes) is not inside the tenant's staging arena of \(stagingBytes) bytes (stagingSize): name only extents ALLOC returned")
        }
        return Extent(offset: offset, length: length)
    }

    /// The store's chunks for a put: arena extents as named, or inline bytes cut at page
    /// boundaries (docs/protocol.md, PUT).
    func chunks(of put: Put, tenant: TenantID) throws(StoreError) -> [TieredStore.PutChunk] {
        switch put.data {
        case .extents(let extents):
            guard !extents.isEmpty else { return [] }
            let stagingBytes = try store.memory(for: tenant).stagingCapacity
            var chunks: [TieredStore.PutChunk] = []
            chunks.reserveCapacity(extents.count)
            for (index, extent) in extents.enumerated() {
                chunks.append(.extent(try Self.stagingExtent(extent, index: index, stagingBytes: stagingBytes)))
            }
            return chunks
        case .inline(let bytes):
            let model = try store.model(put.modelID)
            var chunks: [TieredStore.PutChunk] = []
            var token = Int(put.dataStart)
            var at = 0
            while token < put.tokens.count {
                let end = min((token / model.pageTokens + 1) * model.pageTokens, put.tokens.count)
                let length = (end - token) * model.bytesPerToken
                guard at + length <= bytes.count else {
                    let needed = (put.tokens.count - Int(put.dataStart)) * model.bytesPerToken
                    throw .invalidArgument("inline data holds \(bytes.count) bytes; tokens \(put.dataStart)..<\(put.tokens.count) need \(needed) (\(model.bytesPerToken) per token): send the KV of every token from dataStart")
                }
                let chunk = PageBuffer(overwrittenByteCount: length)
                bytes.withUnsafeBytes { chunk.bytes.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[at..<at + length])) }
                chunks.append(.bytes(chunk))
                at += length
                token = end
            }
            guard at == bytes.count else {
                throw .invalidArgument("inline data holds \(bytes.count - at) bytes more than tokens \(put.dataStart)..<\(put.tokens.count) need (\(at)): send exactly their KV")
            }
            return chunks
        }
    }
}
