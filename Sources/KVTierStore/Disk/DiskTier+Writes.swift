import Dispatch
import KVTierCodec
import KVTierCore
import Logging
import Synchronization

/// A record waiting for the writer: built there, so sequence numbers follow file order.
struct PendingWrite: @unchecked Sendable {
    // Invariant: created by one task, then owned by the writer queue alone.
    enum Body {
        /// A page record encoded by the caller, sequenced and checksummed by the writer.
        case page([UInt8])
        /// Deletes whatever record of the address is live when the writer reaches it.
        case tombstone
        /// A verified record copied by compaction: re-sequenced and re-checksummed on write.
        /// A page copy names its `original` sequence and is skipped if that is no longer live
        /// (rewritten or deleted since); a tombstone copy (`original` nil) is always written.
        case copy([UInt8], original: UInt64?)
    }

    var address: PageAddress
    var body: Body
    var createdMicros: UInt64
    var completion: (Result<StoredPage?, DiskTierError>) -> Void
}

/// The results of records queued together, handed back once the last one completes.
final class WriteResults: Sendable {
    private let state: Mutex<(results: [Result<StoredPage?, DiskTierError>?], left: Int)>
    private let continuation: CheckedContinuation<[Result<StoredPage?, DiskTierError>], Never>

    init(count: Int, _ continuation: CheckedContinuation<[Result<StoredPage?, DiskTierError>], Never>) {
        state = Mutex((Array(repeating: nil, count: count), count))
        self.continuation = continuation
    }

    func set(_ index: Int, _ result: Result<StoredPage?, DiskTierError>) {
        let done = state.withLock { s -> [Result<StoredPage?, DiskTierError>]? in
            precondition(s.results[index] == nil, "a queued record completed twice")
            s.results[index] = result
            s.left -= 1
            return s.left == 0 ? s.results.map { $0! } : nil
        }
        if let done { continuation.resume(returning: done) }
    }
}

extension DiskTier {
    /// Encodes `data` (`shape.layers` sections of keys then values, 16-bit elements) with `codec`
    /// and stores it. Returns once the page is durable (its group fdatasync'ed).
    @discardableResult
    public func write(
        _ address: PageAddress, modelID: UInt64, codec: Codec, shape: PageShape, data: PageBuffer
    ) async throws(DiskTierError) -> StoredPage {
        let record = try encodeRecord(PageWrite(address: address, modelID: modelID, codec: codec, shape: shape, data: data)).get()
        let stored = try await enqueue(address, .page(record))
        guard let stored else { throw .invalidPage("writer returned no location") }
        return stored
    }

    /// One page for `write(_:)`: what `write(_:modelID:codec:shape:data:)` takes.
    public struct PageWrite: Sendable {
        public var address: PageAddress
        public var modelID: UInt64
        public var codec: Codec
        public var shape: PageShape
        public var data: PageBuffer
        /// Hand the record, once durable, to the record copies (`setRecordCopies`).
        public var copyRecord: Bool

        public init(address: PageAddress, modelID: UInt64, codec: Codec, shape: PageShape, data: PageBuffer, copyRecord: Bool = false) {
            self.address = address
            self.modelID = modelID
            self.codec = codec
            self.shape = shape
            self.data = data
            self.copyRecord = copyRecord
        }
    }

    /// Stores many pages as one group commit (or as few as `maxGroupRecords` allows): pages are
    /// encoded on every core, then queued together, so the writer appends them and syncs once.
    /// Results are in `pages` order; a page that fails (its codec refuses it, the disk budget)
    /// fails alone.
    public func write(_ pages: [PageWrite]) async -> [Result<StoredPage, DiskTierError>] {
        guard !pages.isEmpty else { return [] }
        let records = await withTaskGroup(of: (Int, Result<[UInt8], DiskTierError>).self) { group in
            var records = [Result<[UInt8], DiskTierError>](repeating: .failure(.closed), count: pages.count)
            for (i, page) in pages.enumerated() {
                group.addTask { (i, self.encodeRecord(page)) }
            }
            for await (i, record) in group { records[i] = record }
            return records
        }
        var queued: [(Int, PageAddress, PendingWrite.Body)] = []
        for (i, record) in records.enumerated() {
            if case .success(let bytes) = record { queued.append((i, pages[i].address, .page(bytes))) }
        }
        let written = await enqueue(queued.map { ($0.1, $0.2) })
        var results = records.map { record -> Result<StoredPage, DiskTierError> in
            switch record {
            case .failure(let error): .failure(error)
            case .success: .failure(.invalidPage("writer returned no location"))
            }
        }
        for ((i, _, _), result) in zip(queued, written) {
            results[i] = result.flatMap { stored in stored.map { .success($0) } ?? .failure(.invalidPage("writer returned no location")) }
        }
        copyWritten(pages, records, results)
        return results
    }

    /// A page's record, encoded and checked (the writer sequences and seals it).
    private func encodeRecord(_ page: PageWrite) -> Result<[UInt8], DiskTierError> {
        guard page.data.count >= page.shape.rawBytes else {
            return .failure(.invalidPage("page data holds \(page.data.count) bytes, shape \(page.shape) needs \(page.shape.rawBytes)"))
        }
        if let violation = page.shape.model.limitViolation { return .failure(.invalidPage(violation)) }
        let encodeStart = Clocks.monotonicNanoseconds()
        do {
            let record = try PageRecord.encode(address: page.address, modelID: page.modelID, codec: page.codec, shape: page.shape,
                                               data: page.data.readOnly, createdMicros: Clocks.wallMicros())
            observer.withLock { $0 }?.pageEncoded(nanoseconds: Clocks.monotonicNanoseconds() - encodeStart, rawBytes: page.shape.rawBytes)
            return .success(record)
        } catch {
            return .failure(.codec(error))
        }
    }

    /// Deletes a page (a tombstone makes the deletion survive restarts). Returns whether it was stored.
    @discardableResult
    public func delete(_ address: PageAddress) async throws(DiskTierError) -> Bool {
        guard contains(address) else { return false }
        _ = try await enqueue(address, .tombstone)
        return true
    }

    /// Waits for everything queued so far to be durable, then stops accepting writes.
    public func close() async {
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            writer.async {
                self.flush()
                self.state.withLock { $0.closed = true }
                done.resume()
            }
        }
    }

    func enqueue(_ address: PageAddress, _ body: PendingWrite.Body) async throws(DiskTierError) -> StoredPage? {
        try await enqueue([(address, body)])[0].get()
    }

    /// Queues records together (the writer takes them in one group, up to `maxGroupRecords`) and
    /// waits for all of them; results in order.
    func enqueue(_ bodies: [(PageAddress, PendingWrite.Body)]) async -> [Result<StoredPage?, DiskTierError>] {
        guard !bodies.isEmpty else { return [] }
        return await withCheckedContinuation { continuation in
            let results = WriteResults(count: bodies.count, continuation)
            let now = Clocks.wallMicros()
            let items = bodies.enumerated().map { i, body in
                PendingWrite(address: body.0, body: body.1, createdMicros: now) { results.set(i, $0) }
            }
            let (closed, schedule) = state.withLock { s -> (Bool, Bool) in
                if s.closed { return (true, false) }
                s.pending.append(contentsOf: items)
                defer { s.flushScheduled = true }
                return (false, !s.flushScheduled)
            }
            if closed { for item in items { item.completion(.failure(.closed)) } }
            if schedule { writer.async { self.flush() } }
        }
    }

    // MARK: the writer (runs on `writer` only)

    /// Takes everything pending as one group: append, one fdatasync, then acknowledge.
    func flush() {
        dispatchPrecondition(condition: .onQueue(writer))
        while true {
            let group = state.withLock { s -> [PendingWrite] in
                let take = Array(s.pending.prefix(configuration.maxGroupRecords))
                s.pending.removeFirst(take.count)
                if take.isEmpty { s.flushScheduled = false }
                return take
            }
            if group.isEmpty { break }
            commitGroup(group)
        }
        maintain()
    }

    func commitGroup(_ group: [PendingWrite]) {
        if let (error, retryAt) = state.withLock({ $0.suspended }), Clocks.wallMicros() < retryAt {
            let wait = retryAt - Clocks.wallMicros()
            for item in group { item.completion(.failure(.writesSuspended(error, retryInMicros: wait))) }
            return
        }
        do throws(DiskTierError) {
            if state.withLock({ $0.activeSegment == 0 }) { try startSegment() }
            try rotateIfFull(onlyTombstones: group.allSatisfy { if case .tombstone = $0.body { true } else { false } })
            let segment = state.withLock { $0.segments[$0.activeSegment]! }
            let commitStart = Clocks.monotonicNanoseconds()
            let start = segment.appendOffset
            var offset = start
            var staged: [(PendingWrite, RecordHeader, Int)] = []
            var skipped: [PendingWrite] = []
            var groupSequences: [PageAddress: UInt64] = [:]
            var refused: [(PendingWrite, DiskTierError)] = []
            let refusals = self.refusals(group)
            for (i, item) in group.enumerated() {
                if let error = refusals[i] {
                    refused.append((item, error))
                    continue
                }
                guard let (bytes, header) = buildRecord(item, groupSequences, segment: segment, groupStart: start) else {
                    skipped.append(item)
                    continue
                }
                groupSequences[header.address] = header.kind == .page ? header.sequence : 0
                do {
                    try segment.file.write(bytes, at: offset)
                } catch {
                    throw rollBack(segment, to: start, error)
                }
                staged.append((item, header, offset))
                offset += bytes.count
            }
            do { try segment.file.sync() } catch { throw rollBack(segment, to: start, error) }
            observer.withLock { $0 }?.groupCommitted(nanoseconds: Clocks.monotonicNanoseconds() - commitStart, records: staged.count,
                                                     bytes: offset - start)
            let results = apply(staged, in: segment, end: offset)
            for (item, result) in zip(staged.map(\.0), results) { item.completion(.success(result)) }
            for item in skipped { item.completion(.success(nil)) }
            for (item, error) in refused { item.completion(.failure(error)) }
        } catch {
            state.withLock { $0.stats.writeFailures += group.count }
            for item in group { item.completion(.failure(error)) }
        }
    }

    /// The record for `item`, or nil when it has become pointless: a tombstone or a compaction
    /// copy whose page is no longer live. `inGroup` holds the sequences this group has written so
    /// far (0: deleted).
    /// Every record carries `groupStart` (in blocks): all before it is synced and acknowledged,
    /// so recovery and verify can tell damage to acknowledged records from the torn last group.
    private func buildRecord(_ item: PendingWrite, _ inGroup: [PageAddress: UInt64], segment: Segment, groupStart: Int) -> ([UInt8], RecordHeader)? {
        let (sequence, live) = state.withLock { s -> (UInt64, UInt64?) in
            let live = inGroup[item.address].map { $0 == 0 ? nil : $0 } ?? s.index[item.address]?.sequence
            return (s.nextSequence, live)
        }
        let unsealed: [UInt8]
        switch item.body {
        case .page(let record):
            unsealed = record
        case .tombstone:
            guard let live else { return nil }
            unsealed = PageRecord.tombstone(sequence: sequence, address: item.address, deletes: live, createdMicros: item.createdMicros)
        case .copy(let record, let original):
            if let original, live != original { return nil }
            unsealed = record
        }
        let bytes = PageRecord.sealed(unsealed, sequence: sequence, acknowledgedBlocks: UInt32(groupStart / Block.size), format: segment.format)
        state.withLock { $0.nextSequence = sequence + 1 }
        let header = bytes.withUnsafeBytes { try! RecordHeader(decoding: $0) }  // we just built it
        return (bytes, header)
    }

    /// Undo a failed group: cut the segment back to where the group began and pause writes.
    private func rollBack(_ segment: Segment, to offset: Int, _ error: StorageError) -> DiskTierError {
        try? segment.file.truncate(to: offset)
        try? segment.file.sync()
        let retryAt = Clocks.wallMicros() + configuration.retryAfterFailureMicros
        state.withLock { $0.suspended = (error, retryAt) }
        logger.error("disk write failed; writes paused", metadata: [
            "segment": "\(segment.id)", "error": "\(error)", "retryMs": "\(configuration.retryAfterFailureMicros / 1000)",
        ])
        return .storage(error)
    }

    /// Publishes a synced group: index, segment accounting, statistics.
    private func apply(_ staged: [(PendingWrite, RecordHeader, Int)], in segment: Segment, end: Int) -> [StoredPage?] {
        state.withLock { s in
            if s.suspended != nil {
                s.suspended = nil
                logger.info("disk writes resumed", metadata: ["segment": "\(segment.id)"])
            }
            segment.appendOffset = end
            s.stats.groupCommits += 1
            return staged.map { (item, header, offset) -> StoredPage? in
                segment.entries.append(IndexEntry(header, offset: offset))
                s.stats.writes += 1
                switch header.kind {
                case .page:
                    let old = s.index[header.address]
                    if let old { s.segments[old.segment]?.liveBytes -= Block.roundUp(old.recordBytes) }
                    // A compaction copy keeps the page's access history (and so its heat).
                    let copied: Bool = if case .copy = item.body { true } else { false }
                    let location = Location(
                        segment: segment.id, offset: offset, recordBytes: header.recordBytes, sequence: header.sequence,
                        modelID: header.modelID, codecTag: header.codecTag, shape: header.shape,
                        createdMicros: header.createdMicros,
                        lastAccessMicros: copied ? (old?.lastAccessMicros ?? header.createdMicros) : header.createdMicros)
                    s.index[header.address] = location
                    segment.liveBytes += header.paddedBytes
                    if !copied { s.recentWriters.insert(header.address.tenant) }
                    return DiskTier.describe(header.address, location)
                case .tombstone:
                    if let old = s.index[header.address], old.sequence <= header.deletesSequence {
                        s.segments[old.segment]?.liveBytes -= Block.roundUp(old.recordBytes)
                        s.index[header.address] = nil
                    }
                    return nil
                }
            }
        }
    }

    // MARK: segments and the manifest

    /// Seals the active segment once it has reached its size and starts a new one. Deletions
    /// may run up to twice the size first, so that freeing space never needs a new segment (and
    /// so works on a full disk).
    func rotateIfFull(onlyTombstones: Bool = false) throws(DiskTierError) {
        let segment = state.withLock { $0.segments[$0.activeSegment]! }
        let limit = onlyTombstones ? 2 * configuration.segmentBytes : configuration.segmentBytes
        guard segment.appendOffset >= limit, !segment.entries.isEmpty else { return }
        let index = IndexBlock.encode(segment.entries)
        do {
            try segment.file.write(index, at: segment.appendOffset)
            try segment.file.sync()
        } catch {
            throw rollBack(segment, to: segment.appendOffset, error)
        }
        state.withLock { s in
            segment.state = .sealed
            segment.indexOffset = segment.appendOffset
            segment.indexBytes = IndexBlock.length(entries: segment.entries.count)
        }
        try startSegment()
    }

    /// Creates, syncs and registers a new active segment (the manifest names it before any
    /// record goes in).
    func startSegment() throws(DiskTierError) {
        let (id, storeID) = state.withLock { s -> (UInt64, PageKey) in
            defer { s.manifest.nextSegmentID += 1 }
            return (s.manifest.nextSegmentID, s.manifest.storeID)
        }
        let path = "\(configuration.directory)/\(SegmentHeader.fileName(id))"
        let previous = state.withLock { $0.activeSegment }
        do {
            let file = try storage.open(path, .readWriteCreate)
            try file.truncate(to: 0)
            let format = SegmentFormat.current()
            let header = SegmentHeader(segmentID: id, storeID: storeID, createdMicros: Clocks.wallMicros(), format: format).encoded()
            try file.write(header, at: 0)
            try file.sync()
            try storage.syncDirectory(configuration.directory)
            state.withLock { s in
                s.segments[id] = Segment(id: id, file: file, format: format, state: .active, entries: [], appendOffset: Block.size)
                s.activeSegment = id
            }
            try writeManifest()
        } catch {
            let retryAt = Clocks.wallMicros() + configuration.retryAfterFailureMicros
            state.withLock { s in
                s.suspended = (error, retryAt)
                // The new segment never counted: writes must not go to a file the manifest lacks.
                s.segments[id] = nil
                s.activeSegment = previous
            }
            try? storage.remove(path)
            logger.error("cannot start a new segment; writes paused", metadata: ["path": "\(path)", "error": "\(error)"])
            throw .storage(error)
        }
    }

    /// Rewrites MANIFEST from the in-memory segment table: temp file, sync, rename, sync dir.
    func writeManifest() throws(StorageError) {
        let bytes = state.withLock { s -> [UInt8] in
            s.manifest.epoch += 1
            s.manifest.segments = s.segments.values.sorted { $0.id < $1.id }.map { seg in
                Manifest.Segment(id: seg.id, state: seg.state, indexOffset: seg.indexOffset, indexBytes: seg.indexBytes,
                                 sealedBytes: seg.state == .sealed ? seg.appendOffset : 0)
            } + s.manifest.segments.filter { $0.state == .quarantined }
            return s.manifest.encoded()
        }
        let temporary = "\(configuration.directory)/\(Manifest.fileName).tmp"
        let file = try storage.open(temporary, .readWriteCreate)
        defer { file.close() }
        try file.truncate(to: 0)
        try file.write(bytes, at: 0)
        try file.sync()
        try storage.rename(temporary, "\(configuration.directory)/\(Manifest.fileName)")
        try storage.syncDirectory(configuration.directory)
    }
}
