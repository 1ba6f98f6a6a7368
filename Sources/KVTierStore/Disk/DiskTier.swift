#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import Dispatch
import KVTierCodec
import KVTierCore
import Logging
import Synchronization

/// The cold tier: pages in append-only, checksummed segment files (docs/format.md).
///
/// One writer (a serial dispatch queue, so blocking `fdatasync` never stalls the Swift
/// concurrency pool) appends puts in groups and syncs each group once; a put returns only when
/// its group is durable. Reads go through `Storage.read` (io_uring on Linux), verify the record
/// checksum, and decode on the caller's task, so batches decode on every core while later reads
/// are still in flight. Damage is a miss plus a counter and a log line, never bytes.
public final class DiskTier: Sendable {
    struct Location: Equatable {
        var segment: UInt64
        var offset: Int
        var recordBytes: Int
        var sequence: UInt64
        var modelID: UInt64
        var codecTag: UInt32
        var shape: PageShape
        var createdMicros: UInt64
        var lastAccessMicros: UInt64
    }

    final class Segment: @unchecked Sendable {
        // Invariant: mutated only under DiskTier.state's lock; `file` is safe to share.
        let id: UInt64
        let file: any StorageFile
        /// The segment's format and record key (from its header; never leaves the daemon).
        let format: SegmentFormat
        var state: Manifest.SegmentState
        /// Every record appended, live or not: the index block written at seal time.
        var entries: [IndexEntry]
        var appendOffset: Int
        var liveBytes = 0
        var checksumFailures = 0
        /// Recovery found acknowledged records in it unreadable: compaction copies what is
        /// readable out and moves the file to quarantine/ instead of deleting it.
        var damaged = false
        var indexOffset = 0
        var indexBytes = 0

        init(id: UInt64, file: any StorageFile, format: SegmentFormat, state: Manifest.SegmentState, entries: [IndexEntry], appendOffset: Int) {
            self.id = id
            self.file = file
            self.format = format
            self.state = state
            self.entries = entries
            self.appendOffset = appendOffset
        }

        var fileBytes: Int { appendOffset + (state == .sealed ? Block.roundUp(indexBytes) : 0) }
    }

    struct State {
        var index: [PageAddress: Location] = [:]
        var segments: [UInt64: Segment] = [:]
        var activeSegment: UInt64 = 0
        var manifest: Manifest
        var nextSequence: UInt64 = 1
        var pending: [PendingWrite] = []
        var flushScheduled = false
        var suspended: (error: StorageError, retryAtMicros: UInt64)?
        var stats = DiskTierStats()
        var closed = false
        var maintenanceScheduled = false
        /// Tenants whose pages were written since the budget was last enforced: over the
        /// budget, their own pages go first.
        var recentWriters = Set<TenantID>()
    }

    let storage: any Storage
    let configuration: DiskTierConfiguration
    let logger: Logger
    let state: Mutex<State>
    let writer = DispatchQueue(label: "kvtier.disk.writer")
    let readBuffers: PageBufferPool
    /// What start-up recovery found.
    public let recovery: RecoveryReport
    /// How strongly sessions hold a page (set by the tiered store): the disk budget deletes
    /// pages no session holds first, and never a pinned session's. Called under the state
    /// lock, so it must not call back into the disk tier.
    let holds = Mutex<SessionHolds?>(nil)
    /// Told how long reads, decodes, encodes and group commits take (`observe(with:)`).
    let observer = Mutex<(any DiskTierObserver)?>(nil)
    /// Gets copies of page records leaving the tier or written with `PageWrite.copyRecord`
    /// (`setRecordCopies`: the remote tier).
    let recordCopies = Mutex<RecordCopies?>(nil)

    /// Tells the disk budget how strongly sessions hold each page (the tiered store does this).
    public func setSessionHolds(_ hold: @escaping @Sendable (PageAddress) -> SessionCatalog.Hold) {
        holds.withLock { $0 = SessionHolds(hold: hold) }
    }

    /// The lookup the disk budget uses now (read once per pass, outside the state lock).
    func sessionHolds() -> SessionHolds? { holds.withLock { $0 } }

    /// How strongly sessions hold `address`, as the disk budget sees it.
    public func sessionHold(of address: PageAddress) -> SessionCatalog.Hold {
        sessionHolds()?.hold(address) ?? .none
    }

    /// Reports the tier's timings to `observer` from now on.
    public func observe(with observer: any DiskTierObserver) {
        self.observer.withLock { $0 = observer }
    }

    /// Opens (or creates) the store under `configuration.directory`, running recovery first.
    public init(storage: any Storage, configuration: DiskTierConfiguration = DiskTierConfiguration(), logger: Logger) throws(DiskTierError) {
        self.storage = storage
        self.configuration = configuration
        self.logger = logger
        self.readBuffers = PageBufferPool(limitBytes: configuration.readBufferPoolBytes)
        let recovered = try Recovery(storage: storage, configuration: configuration, logger: logger).run()
        self.recovery = recovered.report
        self.state = Mutex(recovered.state)
        // Register what recovery sealed or rebuilt, and make sure a segment takes new writes.
        // A full or failing disk must not keep the store from serving reads: writes stay paused
        // (and retry later) instead.
        let prepared: Result<Void, DiskTierError> = writer.sync { Result { () throws(DiskTierError) in try prepareWrites() } }
        if case .failure(let error) = prepared {
            logger.error("disk tier opened read-only until writes succeed", metadata: ["error": "\(error)"])
        }
        logger.info("disk tier recovered", metadata: [
            "pages": "\(recovered.report.pages)", "segments": "\(recovered.report.segments)",
            "truncatedBytes": "\(recovered.report.truncatedBytes)", "damagedRecords": "\(recovered.report.damagedRecords)",
            "manifestRebuilt": "\(recovered.report.manifestRebuilt)", "elapsedMs": "\(recovered.report.elapsedMicros / 1000)",
        ])
    }

    private func prepareWrites() throws(DiskTierError) {
        if state.withLock({ $0.activeSegment == 0 }) { return try startSegment() }
        do {
            try writeManifest()
        } catch {
            state.withLock { $0.suspended = (error, Clocks.wallMicros() + configuration.retryAfterFailureMicros) }
            throw .storage(error)
        }
    }

    // MARK: queries

    public func contains(_ address: PageAddress) -> Bool { state.withLock { $0.index[address] != nil } }

    /// `contains` for each address, under one lock; those with `skipping` true are not looked
    /// up (false).
    public func containsEach(_ addresses: [PageAddress], skipping: [Bool]) -> [Bool] {
        state.withLock { s in addresses.indices.map { !skipping[$0] && s.index[addresses[$0]] != nil } }
    }

    /// The index of the last address stored, under one lock.
    public func lastContained(_ addresses: [PageAddress]) -> Int? {
        state.withLock { s in addresses.lastIndex { s.index[$0] != nil } }
    }

    public func page(_ address: PageAddress) -> StoredPage? {
        state.withLock { s in s.index[address].map { Self.describe(address, $0) } }
    }

    /// Every page on disk, in no particular order.
    public func pages() -> [StoredPage] {
        state.withLock { s in s.index.map { Self.describe($0.key, $0.value) } }
    }

    public var stats: DiskTierStats {
        state.withLock { s in
            var stats = s.stats
            stats.pages = s.index.count
            stats.liveBytes = s.segments.values.reduce(0) { $0 + $1.liveBytes }
            stats.fileBytes = s.segments.values.filter { $0.state != .quarantined }.reduce(0) { $0 + $1.fileBytes }
            stats.segments = s.segments.values.filter { $0.state != .quarantined }.count
            stats.quarantinedSegments = s.manifest.segments.filter { $0.state == .quarantined }.count
            stats.writesSuspended = s.suspended != nil
            return stats
        }
    }

    public var readPath: String { storage.readPath }

    static func describe(_ address: PageAddress, _ l: Location) -> StoredPage {
        StoredPage(address: address, modelID: l.modelID, codec: (try? Codec(tag: l.codecTag)) ?? Codec(.fp16),
                   shape: l.shape, sequence: l.sequence, segment: l.segment, offset: l.offset, recordBytes: l.recordBytes,
                   createdMicros: l.createdMicros, lastAccessMicros: l.lastAccessMicros)
    }

    // MARK: reads

    /// Reads, verifies and decodes one page, into `destination` when it is given and large enough
    /// (`shape.rawBytes`; pass reused or shared memory there to avoid page faults), else into a
    /// new buffer.
    public func read(_ address: PageAddress, into destination: PageBuffer? = nil) async -> Result<DiskPage, DiskMiss> {
        for _ in 0..<2 {
            guard let (location, file, format) = lookUp(address) else { return .failure(.notStored) }
            let buffer = readBuffers.take(Block.roundUp(location.recordBytes))
            defer { readBuffers.give(buffer) }
            let span = UnsafeMutableRawBufferPointer(rebasing: buffer.bytes[0..<Block.roundUp(location.recordBytes)])
            let observer = self.observer.withLock { $0 }
            let readStart = Clocks.monotonicNanoseconds()
            let result = await storage.read([BlockRead(file: file, offset: location.offset, destination: span)])[0]
            let decodeStart = Clocks.monotonicNanoseconds()
            observer?.pageRead(nanoseconds: decodeStart - readStart, bytes: span.count)
            defer { observer?.pageDecoded(nanoseconds: Clocks.monotonicNanoseconds() - decodeStart, rawBytes: location.shape.rawBytes) }
            switch result {
            case .failure(let error):
                // A segment compacted away mid-read shows up as a closed or missing file.
                if relocated(address, from: location) { continue }
                count { $0.readMisses += 1 }
                logger.warning("disk read failed", metadata: ["page": "\(address)", "error": "\(error)"])
                return .failure(.readFailed(error))
            case .success(let got):
                switch decode(address, location, format, buffer, got, into: destination) {
                case .success(let page): return .success(page)
                case .failure(let miss):
                    if relocated(address, from: location) { continue }
                    checksumFailed(address, location, miss)
                    return .failure(miss)
                }
            }
        }
        count { $0.readMisses += 1 }
        return .failure(.notStored)
    }

    /// Reads many pages with up to `configuration.readConcurrency` reads in flight; pages decode as
    /// their reads complete, on whichever core is free. Results are in request order.
    /// `destinations`, when given, holds one buffer per address (see `read(_:into:)`).
    public func read(_ addresses: [PageAddress], into destinations: [PageBuffer]? = nil) async -> [Result<DiskPage, DiskMiss>] {
        precondition(destinations == nil || destinations!.count == addresses.count, "one destination per address")
        let sizes = state.withLock { s in addresses.map { s.index[$0].map { Block.roundUp($0.recordBytes) } ?? 0 } }
        return await withTaskGroup(of: (Int, Result<DiskPage, DiskMiss>).self) { group in
            var results = [Result<DiskPage, DiskMiss>](repeating: .failure(.notStored), count: addresses.count)
            var next = 0
            var inFlight = 0
            var inFlightBytes = 0
            func launch() {
                let i = next
                next += 1
                inFlight += 1
                inFlightBytes += sizes[i]
                group.addTask { (i, await self.read(addresses[i], into: destinations?[i])) }
            }
            func canLaunch() -> Bool {
                next < addresses.count && inFlight < max(1, configuration.readConcurrency)
                    && (inFlight == 0 || inFlightBytes + sizes[next] <= configuration.readInFlightBytes)
            }
            while canLaunch() { launch() }
            while let (i, result) = await group.next() {
                results[i] = result
                inFlight -= 1
                inFlightBytes -= sizes[i]
                while canLaunch() { launch() }
            }
            return results
        }
    }

    private func lookUp(_ address: PageAddress) -> (Location, any StorageFile, SegmentFormat)? {
        state.withLock { s in
            guard var location = s.index[address], let segment = s.segments[location.segment] else { return nil }
            location.lastAccessMicros = Clocks.wallMicros()
            s.index[address] = location
            s.stats.reads += 1
            return (location, segment.file, segment.format)
        }
    }

    private func relocated(_ address: PageAddress, from location: Location) -> Bool {
        state.withLock { s in
            guard let now = s.index[address] else { return false }
            return now.segment != location.segment || now.offset != location.offset
        }
    }

    private func decode(
        _ address: PageAddress, _ location: Location, _ format: SegmentFormat, _ buffer: PageBuffer, _ got: Int, into destination: PageBuffer?
    ) -> Result<DiskPage, DiskMiss> {
        guard got >= location.recordBytes else { return .failure(.damaged("record is cut short at \(got) of \(location.recordBytes) bytes")) }
        let record = UnsafeRawBufferPointer(rebasing: buffer.readOnly[0..<location.recordBytes])
        do {
            let header = try PageRecord.verify(record, format: format)
            guard header.kind == .page, header.address == address, header.sequence == location.sequence else {
                return .failure(.damaged("record at offset \(location.offset) is not the indexed page"))
            }
            let output = destination.flatMap { $0.count >= header.shape.rawBytes ? $0 : nil }
                ?? PageBuffer(overwrittenByteCount: header.shape.rawBytes)
            try PageRecord.decodePage(record, header, into: output.bytes)
            var described = Self.describe(address, location)
            described.lastAccessMicros = Clocks.wallMicros()
            return .success(DiskPage(page: described, data: output))
        } catch let error as FormatError {
            return .failure(.damaged("\(error)"))
        } catch {
            return .failure(.damaged("\(error)"))
        }
    }

    func count(_ update: (inout DiskTierStats) -> Void) { state.withLock { update(&$0.stats) } }
}
