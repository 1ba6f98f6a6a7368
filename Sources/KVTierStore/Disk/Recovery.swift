import KVTierCore
import Logging
import Synchronization

/// Start-up: read the store (`DiskImage`: the manifest, sealed segments' index blocks, scans of
/// the others), then act on it: cut torn tails, drop orphans, quarantine segments whose header
/// does not check, seal all but the newest active segment, and rebuild the index from the
/// replay `kvtier verify` uses too (docs/format.md, "Recovery").
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

        let image: DiskImage
        do { image = try DiskImage.read(storage, directory: directory, purpose: .recovery) } catch { throw .storage(error) }
        if image.manifestRebuilt {
            report.manifestRebuilt = true
            logger.warning("manifest missing or damaged; rebuilding it from the segment files", metadata: [
                "segments": "\(image.segments.count + image.missing.count)", "problem": "\(image.manifestProblem?.description ?? "missing")",
            ])
        }
        var manifest = image.manifest ?? Manifest(epoch: 0, storeID: Self.newStoreID(), nextSegmentID: 1, segments: [])
        if image.storeID == nil { manifest.storeID = Self.newStoreID() }
        var state = DiskTier.State(manifest: manifest)

        // Orphans: created but never registered, or compacted but not yet deleted.
        for id in image.orphans {
            try? storage.remove(path(id))
            report.orphanSegmentsRemoved += 1
        }
        if report.orphanSegmentsRemoved > 0 { try? storage.syncDirectory(directory) }

        for described in image.missing {
            logger.error("segment named by the manifest is missing", metadata: ["segment": "\(described.id)"])
            report.damagedRecords += 1
        }
        let newestActive = state.manifest.segments.filter { $0.state == .active }.map(\.id).max()
        for read in image.segments where read.role == .listed {
            let described = read.entry!
            let file = read.file
            // The segment header names the format, and the key that checks its records.
            guard let segmentHeader = read.header else {
                // Nothing in it can be checked: keep the file for inspection, out of service.
                logger.error("segment header is unreadable; the segment is quarantined", metadata: [
                    "segment": "\(described.id)", "error": "\(read.headerError.map { "\($0)" } ?? "unreadable")",
                ])
                report.damagedRecords += 1
                file.close()
                try? storage.rename(path(described.id), "\(directory)/quarantine/\(SegmentHeader.fileName(described.id))")
                try? storage.syncDirectory("\(directory)/quarantine")
                if let i = state.manifest.segments.firstIndex(where: { $0.id == described.id }) { state.manifest.segments[i].state = .quarantined }
                continue
            }
            if read.foreign {
                logger.error("segment belongs to another store; ignoring it", metadata: ["segment": "\(described.id)"])
                file.close()
                continue
            }
            if read.recordsFromIndex { report.indexBlocksLoaded += 1 }
            if let error = read.indexError {
                logger.warning("index block is damaged; scanning the segment instead", metadata: ["segment": "\(described.id)", "error": "\(error)"])
            }
            var appendOffset = described.sealedBytes
            var damaged = false
            if let scan = read.scan {
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
                appendOffset = max(scan.validEnd, Block.size)
            }
            // The newest active segment takes new writes; any other unsealed one gets sealed
            // below, and so does a damaged one or one of an older format (records are written
            // only in the current one).
            let current = segmentHeader.format.version == SegmentHeader.version
            let isActive = described.state == .active && described.id == newestActive && !report.manifestRebuilt && current && !damaged
            let segment = DiskTier.Segment(id: described.id, file: file, format: segmentHeader.format, state: isActive ? .active : .sealed,
                                           entries: read.records, appendOffset: appendOffset)
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
        }

        // Apply in write order (the rule `kvtier verify` shares, over the same records).
        let next = image.replay(into: &state.index, sequence: { $0.sequence }) { entry in
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
