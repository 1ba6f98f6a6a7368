import Dispatch
import KVTierCore
import Synchronization

/// The remote tier (T3) in the store: `LOOKUP` and `GET` see the pages it holds past the local
/// prefix; `GET` promotes them into RAM once `RemoteRecord.open` has checked each; pages leave
/// for it as the disk tier writes or deletes their records (`remotePages`).
extension TieredStore {
    /// Where blocking remote calls made from async code run: threads of their own, never the
    /// cooperative pool. The remote tier bounds how many wait at once (its connections).
    static let remoteCalls = DispatchQueue(label: "kvtier.remote.calls", attributes: .concurrent)

    /// A blocking remote call, from async code.
    func onRemoteQueue<T: Sendable>(_ call: @escaping @Sendable () -> T) async -> T {
        await withCheckedContinuation { (done: CheckedContinuation<T, Never>) in
            Self.remoteCalls.async { done.resume(returning: call()) }
        }
    }

    /// Most bytes of remote values one batched fetch may bring (each value counted at its upper
    /// bound, `RemoteRecord.maxValueBytes`): what one GET holds in flight from the remote tier.
    public static let remoteBatchBytes = 64 << 20

    /// The tier of each address in this host's tiers (nil: in neither): one lock of the store,
    /// one of the disk tier.
    func localTiers(_ addresses: [PageAddress]) -> [Tier?] {
        let inRAM = state.withLock { s in addresses.map { s.resident[$0] != nil } }
        guard let disk, inRAM.contains(false) else { return inRAM.map { $0 ? .ram : nil } }
        let onDisk = disk.containsEach(addresses, skipping: inRAM)
        return addresses.indices.map { inRAM[$0] ? .ram : onDisk[$0] ? .disk : nil }
    }

    /// The pages after a located prefix that may extend it: the remaining whole-page keys, when
    /// there is a remote tier and the prefix does not end on a partial page (the remote tier
    /// holds whole pages only).
    func remoteCandidates(_ tenant: TenantID, _ model: ModelSpec, keys: [PageKey], located: [PageRef]) -> [PageAddress] {
        guard remote != nil, located.count < keys.count, located.last.map({ $0.tokens.count == model.pageTokens }) ?? true else { return [] }
        return keys[located.count...].map { PageAddress(tenant: tenant, key: $0) }
    }

    /// `locate`, then the pages after the local prefix that this host's tiers or the remote tier
    /// hold, as far as they run unbroken: the remote tier is asked once (one pipeline of EXISTS)
    /// for the pages this host lacks. Blocks on the remote tier for at most its timeout: for the
    /// connection's thread (`LOOKUP`), not the cooperative pool.
    func locateIncludingRemote(_ tenant: TenantID, _ model: ModelSpec, _ tokens: [UInt32], keys: [PageKey]) -> [PageRef] {
        let located = locate(tenant, model, tokens, keys: keys)
        let candidates = remoteCandidates(tenant, model, keys: keys, located: located)
        guard let remote, !candidates.isEmpty else { return located }
        let local = localTiers(candidates)
        let asked = candidates.indices.filter { local[$0] == nil }
        var held = Array(repeating: false, count: candidates.count)
        for (index, found) in zip(asked, remote.tier.contains(asked.map { candidates[$0] })) { held[index] = found }
        var pages = located
        let size = model.pageTokens
        for (offset, address) in candidates.enumerated() {
            guard let tier = local[offset] ?? (held[offset] ? .remote : nil) else { break }
            let index = located.count + offset
            pages.append(PageRef(address: address, tokens: index * size..<(index + 1) * size, tier: tier))
        }
        return pages
    }

    /// For a GET whose local prefix ends before `candidates`: the pages among them this host
    /// lacks are fetched from the remote tier (one batched request per `remoteBatchBytes`, up to `limit`
    /// pages), each checked by `RemoteRecord.open` and decoded straight into an extent of the
    /// tenant's arena, on every core, then made resident with a store hold (listed in `held`).
    /// Returns the pages that extend the prefix: promoted ones as `ram`, this host's own as
    /// their tier, up to the first page neither has. A value that fails its checks is a miss
    /// (counted), never bytes.
    func promoteFromRemote(_ tenant: TenantID, _ model: ModelSpec, _ memory: any PageMemory, _ candidates: [PageAddress],
                           firstIndex: Int, limit: Int, held: inout Set<PageAddress>) async -> [PageRef] {
        guard let remote, limit > 0 else { return [] }
        let candidates = Array(candidates.prefix(limit))
        var tiers = localTiers(candidates)
        let maxValue = RemoteRecord.maxValueBytes(model)
        let batchPages = max(1, Self.remoteBatchBytes / maxValue)
        let pageBytes = model.pageShape(tokens: model.pageTokens).rawBytes
        // The batches: pages this host lacks, in prefix order, a batch ending where a local page
        // interrupts the run of missing ones or where it is full.
        var batches: [[Int]] = []
        var current: [Int] = []
        for index in candidates.indices {
            if tiers[index] == nil { current.append(index) } else if !current.isEmpty { batches.append(current); current = [] }
            if current.count == batchPages { batches.append(current); current = [] }
        }
        if !current.isEmpty { batches.append(current) }
        // One batch in flight ahead of the one being verified and decoded, so the network and
        // the cores work at once; a batch that turns out short wastes at most that one fetch.
        func fetch(_ batch: [Int]) -> Task<[RemoteValue?], Never> {
            let addresses = batch.map { candidates[$0] }
            return Task { await onRemoteQueue { remote.tier.fetch(addresses, maxValueBytes: maxValue) } }
        }
        var ahead = batches.first.map(fetch)
        fetching: for (number, batch) in batches.enumerated() {
            guard let inFlight = ahead else { break }
            let values = await inFlight.value
            ahead = number + 1 < batches.count ? fetch(batches[number + 1]) : nil
            let addresses = batch.map { candidates[$0] }
            let present = values.prefix { $0 != nil }.count
            defer { for value in values { value?.recycle() } }
            guard present > 0 else { break }
            await makeRoom(reserving: (tenant, present * Self.extentBytes(pageBytes)))
            var extents: [Extent] = []
            for _ in 0..<present {
                guard let extent = memory.allocate(pageBytes) else { break }
                extents.append(extent)
            }
            let key = remote.key
            let opened = await withTaskGroup(of: (Int, Result<Int, RemoteRecord.Rejection>).self) { group in
                for (i, extent) in extents.enumerated() {
                    let value = values[i]!, address = addresses[i], buffer = memory.buffer(extent)
                    group.addTask {
                        (i, Result { () throws(RemoteRecord.Rejection) in
                            try RemoteRecord.open(value.bytes, key: key, address: address, model: model, into: buffer.bytes)
                        })
                    }
                }
                var results = [Result<Int, RemoteRecord.Rejection>](repeating: .failure(.malformed("not fetched")), count: extents.count)
                for await (i, result) in group { results[i] = result }
                return results
            }
            let now = Clocks.monotonicMicros()
            var unused: [Extent] = []
            var rejected: [(PageAddress, RemoteRecord.Rejection)] = []
            let promoted = state.withLock { s -> Int in
                var promoted = 0
                for (i, result) in opened.enumerated() {
                    let address = addresses[i]
                    guard promoted == i, case .success(let tokens) = result else {
                        if case .failure(let why) = result {
                            s.counters.remoteRejected += 1
                            rejected.append((address, why))
                        }
                        unused.append(extents[i])
                        continue
                    }
                    if s.resident[address] == nil {
                        s.insertResident(address, Resident(extent: extents[i], modelID: model.id, tokens: tokens, holds: 1,
                                                           lastAccessMicros: now, residentSinceMicros: now, onDisk: false,
                                                           fromRemote: true))
                        s.counters.remotePromotions += 1
                    } else {
                        // Stored meanwhile (a put, another GET's promotion): that copy serves.
                        unused.append(extents[i])
                        s.resident[address]!.holds += 1
                    }
                    promoted += 1
                }
                return promoted
            }
            for extent in unused { memory.free(extent) }
            for (address, why) in rejected.prefix(1) {
                logger.warning("remote page refused; served as a miss", metadata: ["page": "\(address)", "reason": "\(why)"])
            }
            for i in 0..<promoted {
                held.insert(addresses[i])
                tiers[batch[i]] = .ram
            }
            if promoted < batch.count { break fetching }
        }
        // A batch fetched ahead of a short one: its buffers go back.
        if let ahead { for value in await ahead.value { value?.recycle() } }
        var pages: [PageRef] = []
        let size = model.pageTokens
        for (offset, tier) in tiers.enumerated() {
            guard let tier else { break }
            let index = firstIndex + offset
            pages.append(PageRef(address: candidates[offset], tokens: index * size..<(index + 1) * size, tier: tier))
        }
        return pages
    }

    /// The disk tier's record copies, for the remote tier: whole pages of known models only
    /// (partial pages end a sequence and are not looked for there). Only queues.
    func offerRemote(_ copies: [RecordCopy]) {
        guard let remote else { return }
        let pageTokens = state.withLock { s in s.models.mapValues(\.pageTokens) }
        let pages = copies.compactMap { copy -> RemotePageWrite? in
            let header = copy.record.withUnsafeBytes { try? RecordHeader(decoding: $0) }
            guard let header, header.kind == .page, pageTokens[header.modelID] == header.shape.tokens else { return nil }
            return RemotePageWrite(address: copy.address, record: copy.record)
        }
        if !pages.isEmpty { remote.tier.offer(pages) }
    }

    /// Whether `persist` sends a page's record to the remote tier once it is on disk.
    func copiesToRemote(_ page: Resident, _ model: ModelSpec, durable: Bool) -> Bool {
        guard let remote, !page.fromRemote, page.tokens == model.pageTokens else { return false }
        switch remote.pages {
        case .evicted: return false
        case .durable: return durable
        case .all: return true
        }
    }

    /// The store's remote counters, for `status` (none without a remote tier).
    func remoteCounters(_ c: Counters) -> [(name: String, value: UInt64)] {
        guard remote != nil else { return [] }
        return [("lookup_hits_remote", UInt64(c.hitsRemote)), ("remote_promotions", UInt64(c.remotePromotions)),
                ("remote_rejected", UInt64(c.remoteRejected))]
    }
}
