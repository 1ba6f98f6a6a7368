import KVTierProtocol

extension KVTierClient {
    /// The tenant's pages (of one model, or all), RAM pages hottest first, then disk-only pages
    /// most recently used first; fetched `Pages.maxPagesPerReply` at a time.
    public func pages(modelID: UInt64? = nil, limit: Int = .max) async throws -> (total: Int, pages: [PageInfo]) {
        var pages: [PageInfo] = []
        var total = 0
        while pages.count < limit {
            let batch = UInt32(min(Pages.maxPagesPerReply, limit - pages.count))
            let reply = try await call(.pages(Pages(modelID: modelID ?? 0, offset: UInt32(clamping: pages.count), limit: batch)),
                                       expecting: "PAGES") { if case .pages(let r) = $0 { r } else { nil } }
            total = Int(reply.total)
            pages += reply.pages
            if reply.pages.count < Int(batch) || pages.count >= total { break }
        }
        return (total, pages)
    }

    /// Moves the cached prefix of `tokens` out of RAM (to disk, or gone with `deleteFromDisk`).
    public func evict(_ model: RegisteredModel, tokens: [UInt32], deleteFromDisk: Bool = false) async throws -> EvictReply {
        try await call(.evict(Evict(modelID: model.modelID, tokens: tokens, deleteFromDisk: deleteFromDisk, everyPage: false)),
                       expecting: "EVICT") { if case .evict(let r) = $0 { r } else { nil } }
    }

    /// Moves a session's pages out of RAM (without counting as a use of the session).
    public func evictSession(_ name: String, deleteFromDisk: Bool = false) async throws -> EvictReply {
        try await call(.evict(Evict(modelID: 0, tokens: [], deleteFromDisk: deleteFromDisk, everyPage: false, session: name)),
                       expecting: "EVICT") { if case .evict(let r) = $0 { r } else { nil } }
    }

    /// Moves every page of the tenant (of one model, or all) out of RAM.
    public func evictAll(modelID: UInt64? = nil, deleteFromDisk: Bool = false) async throws -> EvictReply {
        try await call(.evict(Evict(modelID: modelID ?? 0, tokens: [], deleteFromDisk: deleteFromDisk, everyPage: true)),
                       expecting: "EVICT") { if case .evict(let r) = $0 { r } else { nil } }
    }
}

extension KVTierClient {
    /// The models this tenant registered since the daemon started, and its sessions' models,
    /// by id; fetched `maxListEntries` at a time.
    public func models() async throws -> [ModelEntry] {
        try await wholeList(Request.models, expecting: "MODELS") { if case .models(let r) = $0 { (r.total, r.models) } else { nil } }
    }

    /// The disk codec of each of this tenant's models (those `models()` lists), as the daemon's
    /// codec policy decided it for this tenant, by model id.
    public func codecChoices() async throws -> [CodecChoiceInfo] {
        try await wholeList(Request.codecs, expecting: "CODECS") { if case .codecs(let r) = $0 { (r.total, r.choices) } else { nil } }
    }

    /// Every entry of a list request, fetched a page (`ListPage`) at a time.
    func wholeList<Entry>(_ request: (ListPage) -> Request, expecting name: String,
                          _ extract: (Reply) -> (total: UInt32, entries: [Entry])?) async throws -> [Entry] {
        var entries: [Entry] = []
        while true {
            let page = ListPage(offset: UInt32(clamping: entries.count))
            let reply = try await call(request(page), expecting: name, extract)
            entries += reply.entries
            if reply.entries.count < Int(page.limit) || entries.count >= Int(reply.total) { return entries }
        }
    }
}
