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

        var entries: [RecordReplay.Entry] = []
        let newestActive = state.manifest.segments.filter { $0.state == .active }.map(\.id).max()
        for described in state.manifest.segments where described.state != .quarantined {
            guard onDisk.contains(described.id) else {
                logger.error("segment named by the manifest is missing", metadata: ["segment": "\(described.id)"])
                report.damagedRecords += 1
                continue
            }
            let file: any StorageFile
            do { file = try storage.open(path(described.id), .readWriteCreate) } catch { throw .storage(error) }
            // The segment header names the format, and the key that checks its records.
            let block = PageBuffer(byteCount: Block.size)
            guard (try? file.read(into: block.bytes, at: 0)) == Block.size,
                  let segmentHeader = try? SegmentHeader(decoding: block.readOnly) else {
                // Nothing in it can be checked: keep the file for inspection, out of service.
                logger.error("segment header is unreadable; the segment is quarantined", metadata: ["segment": "\(described.id)"])
                report.damagedRecords += 1
                file.close()
                try? storage.rename(path(described.id), "\(directory)/quarantine/\(SegmentHeader.fileName(described.id))")
                try? storage.syncDirectory("\(directory)/quarantine")
                if let i = state.manifest.segments.firstIndex(where: { $0.id == described.id }) { state.manifest.segments[i].state = .quarantined }
                continue
            }
            if segmentHeader.storeID != state.manifest.storeID {
                logger.error("segment belongs to another store; ignoring it", metadata: ["segment": "\(described.id)"])
                continue
            }
            var loaded: [IndexEntry]? = nil
            if described.state == .sealed, described.indexBytes > 0 {
                loaded = loadIndex(file, described)
                if loaded != nil { report.indexBlocksLoaded += 1 }
            }
            var appendOffset = described.sealedBytes
            var damaged = false
            if loaded == nil {
                let scan: SegmentScanner.Result
                let acknowledged = described.state == .sealed ? described.sealedBytes : 0
                do { scan = try SegmentScanner(file: file).scan(acknowledged: acknowledged) } catch { throw .storage(error) }
                report.recordsScanned += scan.records.count
                if !scan.damaged.isEmpty {
                    // Acknowledged records are unreadable: count them, keep the segment as it is
                    // (never cut below what was acknowledged) and take it out of appends.
                    damaged = true
                    report.damagedRecords += scan.damaged.count
                    logger.error("acknowledged records are damaged; the segment is kept and sealed, run kvtier verify", metadata: [
                        "segment": "\(described.id)", "damaged": "\(scan.damaged.count)",
                        "firstOffset": "\(scan.damaged[0].offset)", "error": "\(scan.damaged[0].error)",
                    ])
                }
                if scan.tailBytes > 0 {
                    do {
                        try file.truncate(to: scan.validEnd)
                        try file.sync()
                    } catch { throw .storage(error) }
                    report.truncatedBytes += scan.tailBytes
                }
                loaded = scan.records.map { IndexEntry($0.header, offset: $0.offset) }
                entries += scan.damaged.compactMap { d in
                    d.header.map { RecordReplay.Entry(header: $0, segment: described.id, offset: d.offset, damaged: true) }
                }
                appendOffset = max(scan.validEnd, Block.size)
            }
            let records = loaded ?? []
            // The newest active segment takes new writes; any other unsealed one gets sealed
            // below, and so does a damaged one or one of an older format (records are written
            // only in the current one).
            let current = segmentHeader.format.version == SegmentHeader.version
            let isActive = described.state == .active && described.id == newestActive && !report.manifestRebuilt && current && !damaged
            let segment = DiskTier.Segment(id: described.id, file: file, format: segmentHeader.format, state: isActive ? .active : .sealed,
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
            segment.damaged = damaged
            state.segments[described.id] = segment
            if isActive { state.activeSegment = described.id }
            entries += records.map { RecordReplay.Entry(header: $0.header, segment: described.id, offset: $0.offset) }
        }

        // Apply in write order (the rule `kvtier verify` shares).
        let next = RecordReplay.replay(entries, into: &state.index, sequence: { $0.sequence }) { entry in
            let h = entry.header
            return DiskTier.Location(
                segment: entry.segment, offset: entry.offset, recordBytes: h.recordBytes, sequence: h.sequence,
                modelID: h.modelID, codecTag: h.codecTag, shape: h.shape, createdMicros: h.createdMicros,
                lastAccessMicros: h.createdMicros)
        }
        state.nextSequence = max(state.nextSequence, next)
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
