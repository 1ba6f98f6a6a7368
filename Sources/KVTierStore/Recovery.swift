import KVTierCore
import Logging
import Synchronization

/// Start-up: read the manifest, load sealed segments' index blocks, scan the active segment,
/// cut torn tails, drop orphans, rebuild the index (docs/format.md, "Recovery").
struct Recovery {
    let storage: any Storage
    let configuration: DiskTierConfiguration
    let logger: Logger

    var directory: String { configuration.directory }

    func run() throws(DiskTierError) -> (state: DiskTier.State, report: RecoveryReport) {
        let started = Clocks.wallMicros()
        var report = RecoveryReport()
        do {
            try storage.makeDirectory(directory)
            try storage.makeDirectory("\(directory)/quarantine")
        } catch { throw .storage(error) }
        let temporary = "\(directory)/\(Manifest.fileName).tmp"
        if storage.exists(temporary) { try? storage.remove(temporary) }

        let names: [String]
        do { names = try storage.list(directory) } catch { throw .storage(error) }
        let onDisk = Set(names.compactMap(SegmentHeader.id(fromFileName:)))

        var manifest = readManifest()
        if manifest == nil, !onDisk.isEmpty {
            report.manifestRebuilt = true
            logger.warning("manifest missing or damaged; rebuilding it from the segment files", metadata: ["segments": "\(onDisk.count)"])
        }
        if manifest == nil {
            manifest = Manifest(epoch: 0, storeID: onDisk.isEmpty ? Self.newStoreID() : (storeID(of: onDisk.min()!) ?? Self.newStoreID()),
                                nextSegmentID: (onDisk.max() ?? 0) + 1,
                                segments: onDisk.sorted().map { Manifest.Segment(id: $0, state: .active) })
        }
        var state = DiskTier.State(manifest: manifest!)
        let listed = Set(state.manifest.segments.map(\.id))

        // Orphans: created but never registered, or compacted but not yet deleted.
        for id in onDisk.subtracting(listed) {
            try? storage.remove(path(id))
            report.orphanSegmentsRemoved += 1
        }
        if report.orphanSegmentsRemoved > 0 { try? storage.syncDirectory(directory) }

        var entries: [(entry: IndexEntry, segment: UInt64)] = []
        let newestActive = state.manifest.segments.filter { $0.state == .active }.map(\.id).max()
        for described in state.manifest.segments where described.state != .quarantined {
            guard onDisk.contains(described.id) else {
                logger.error("segment named by the manifest is missing", metadata: ["segment": "\(described.id)"])
                report.damagedRecords += 1
                continue
            }
            let file: any StorageFile
            do { file = try storage.open(path(described.id), .readWriteCreate) } catch { throw .storage(error) }
            var loaded: [IndexEntry]? = nil
            if described.state == .sealed, described.indexBytes > 0 {
                loaded = loadIndex(file, described)
                if loaded != nil { report.indexBlocksLoaded += 1 }
            }
            var appendOffset = described.sealedBytes
            if loaded == nil {
                let scan: SegmentScanner.Result
                do { scan = try SegmentScanner(file: file).scan() } catch { throw .storage(error) }
                if let header = scan.segmentHeader, header.storeID != state.manifest.storeID {
                    logger.error("segment belongs to another store; ignoring it", metadata: ["segment": "\(described.id)"])
                    continue
                }
                report.recordsScanned += scan.records.count
                report.damagedRecords += scan.damaged.count
                if scan.tailBytes > 0 {
                    do {
                        try file.truncate(to: scan.validEnd)
                        try file.sync()
                    } catch { throw .storage(error) }
                    report.truncatedBytes += scan.tailBytes
                }
                loaded = scan.records.map { IndexEntry($0.header, offset: $0.offset) }
                appendOffset = max(scan.validEnd, Block.size)
            }
            let records = loaded ?? []
            // The newest active segment takes new writes; any other unsealed one gets sealed below.
            let isActive = described.state == .active && described.id == newestActive && !report.manifestRebuilt
            let segment = DiskTier.Segment(id: described.id, file: file, state: isActive ? .active : .sealed,
                                           entries: records, appendOffset: appendOffset)
            if described.state == .sealed {
                segment.indexOffset = described.indexOffset
                segment.indexBytes = described.indexBytes
            } else if !isActive {
                // Without room for an index block the segment stays unindexed: the next start
                // scans it again, which is slower but loses nothing.
                do { try seal(segment) } catch {
                    logger.warning("could not index a recovered segment", metadata: ["segment": "\(described.id)", "error": "\(error)"])
                }
            }
            state.segments[described.id] = segment
            if isActive { state.activeSegment = described.id }
            entries += records.map { ($0, described.id) }
        }

        // Apply in write order: later page records replace earlier ones; a tombstone deletes the
        // record it names and any older one.
        entries.sort { $0.entry.header.sequence < $1.entry.header.sequence }
        state.index.reserveCapacity(entries.count)
        for (entry, segmentID) in entries {
            let h = entry.header
            state.nextSequence = max(state.nextSequence, h.sequence + 1)
            switch h.kind {
            case .page:
                state.index[h.address] = DiskTier.Location(
                    segment: segmentID, offset: entry.offset, recordBytes: h.recordBytes, sequence: h.sequence,
                    modelID: h.modelID, codecTag: h.codecTag, shape: h.shape, createdMicros: h.createdMicros,
                    lastAccessMicros: h.createdMicros)
            case .tombstone:
                // Deletes the page's record if it is the one named or older (an older record can
                // outlive a compacted newer one).
                if let live = state.index[h.address], live.sequence <= h.deletesSequence { state.index[h.address] = nil }
            }
        }
        for location in state.index.values { state.segments[location.segment]?.liveBytes += Block.roundUp(location.recordBytes) }

        report.pages = state.index.count
        report.segments = state.segments.count
        report.elapsedMicros = Clocks.wallMicros() - started
        return (state, report)
    }

    func path(_ id: UInt64) -> String { "\(directory)/\(SegmentHeader.fileName(id))" }

    private func readManifest() -> Manifest? {
        let path = "\(directory)/\(Manifest.fileName)"
        guard storage.exists(path), let file = try? storage.open(path, .read) else { return nil }
        defer { file.close() }
        guard let size = try? file.size(), size <= 64 << 20 else { return nil }
        let buffer = PageBuffer(byteCount: size)
        guard (try? file.read(into: buffer.bytes, at: 0)) == size else { return nil }
        do {
            return try Manifest(decoding: UnsafeRawBufferPointer(rebasing: buffer.readOnly[0..<size]))
        } catch {
            logger.error("manifest is damaged", metadata: ["error": "\(error)"])
            return nil
        }
    }

    private func storeID(of segment: UInt64) -> PageKey? {
        guard let file = try? storage.open(path(segment), .read) else { return nil }
        let block = PageBuffer(byteCount: Block.size)
        guard (try? file.read(into: block.bytes, at: 0)) == Block.size else { return nil }
        return try? SegmentHeader(decoding: block.readOnly).storeID
    }

    private func loadIndex(_ file: any StorageFile, _ described: Manifest.Segment) -> [IndexEntry]? {
        let length = Block.roundUp(described.indexBytes)
        let buffer = PageBuffer(byteCount: length)
        guard (try? file.read(into: buffer.bytes, at: described.indexOffset)) == length else { return nil }
        do {
            return try IndexBlock.decode(UnsafeRawBufferPointer(rebasing: buffer.readOnly[0..<described.indexBytes]))
        } catch {
            logger.warning("index block is damaged; scanning the segment instead", metadata: ["segment": "\(described.id)", "error": "\(error)"])
            return nil
        }
    }

    /// Appends an index block to a scanned segment so the next start loads it directly.
    private func seal(_ segment: DiskTier.Segment) throws(DiskTierError) {
        let index = IndexBlock.encode(segment.entries)
        do {
            try segment.file.write(index, at: segment.appendOffset)
            try segment.file.sync()
        } catch { throw .storage(error) }
        segment.indexOffset = segment.appendOffset
        segment.indexBytes = IndexBlock.length(entries: segment.entries.count)
    }

    static func newStoreID() -> PageKey {
        var generator = SystemRandomNumberGenerator()
        return PageKey(high: generator.next(), low: generator.next())
    }
}
