import Dispatch
import KVTierCore
import Logging
import Synchronization

extension DiskTier {
    /// Counts a failed read against its segment; enough of them quarantine the segment.
    func checksumFailed(_ address: PageAddress, _ location: Location, _ miss: DiskMiss) {
        let quarantine = state.withLock { s -> Bool in
            s.stats.checksumFailures += 1
            s.stats.readMisses += 1
            // The damaged record can never be served: forget it.
            if s.index[address]?.sequence == location.sequence {
                s.index[address] = nil
                s.segments[location.segment]?.liveBytes -= Block.roundUp(location.recordBytes)
            }
            guard let segment = s.segments[location.segment] else { return false }
            segment.checksumFailures += 1
            return segment.checksumFailures == configuration.quarantineAfterFailures
        }
        logger.error("page record failed verification; served as a miss", metadata: [
            "page": "\(address)", "segment": "\(location.segment)", "offset": "\(location.offset)", "reason": "\(miss)",
        ])
        if quarantine {
            writer.async { self.quarantine(location.segment) }
        }
    }

    /// Takes a segment out of service: its pages leave the index, the file moves to quarantine/.
    func quarantine(_ id: UInt64) {
        dispatchPrecondition(condition: .onQueue(writer))
        let removed = state.withLock { s -> Segment? in
            guard let segment = s.segments.removeValue(forKey: id) else { return nil }
            for (address, location) in s.index where location.segment == id { s.index[address] = nil }
            s.manifest.segments.append(Manifest.Segment(id: id, state: .quarantined))
            return segment
        }
        guard removed != nil else { return }
        let name = SegmentHeader.fileName(id)
        do {
            try storage.rename("\(configuration.directory)/\(name)", "\(configuration.directory)/quarantine/\(name)")
            try storage.syncDirectory("\(configuration.directory)/quarantine")
            if state.withLock({ $0.activeSegment == id }) { try startSegment() } else { try writeManifest() }
        } catch {
            logger.error("could not finish quarantining a segment", metadata: ["segment": "\(id)", "error": "\(error)"])
        }
        logger.error("segment quarantined after repeated checksum failures", metadata: [
            "segment": "\(id)", "failures": "\(configuration.quarantineAfterFailures)",
        ])
    }

    /// Runs compaction now (normally it runs after writes when a segment qualifies).
    public func compact() async {
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            writer.async {
                self.maintain(force: true)
                done.resume()
            }
        }
    }

    /// After each flush: keep within the disk budget, then compact sparse segments.
    func maintain(force: Bool = false) {
        dispatchPrecondition(condition: .onQueue(writer))
        // Runs even while writes are paused: compacting a segment with nothing live left needs
        // no new writes, and is how deletions free space on a full disk.
        enforceBudget()
        var attempts = 0
        while let victim = compactionCandidate(force: force), attempts < 64 {
            attempts += 1
            guard compactSegment(victim) else { break }
        }
    }

    /// The sealed segment with the lowest live fraction, if it is below the threshold (or the
    /// files are over budget, or `force`).
    private func compactionCandidate(force: Bool) -> UInt64? {
        state.withLock { s in
            let files = s.segments.values.reduce(0) { $0 + $1.fileBytes }
            let overBudget = configuration.budgetBytes.map { files > $0 } ?? false
            let sealed = s.segments.values.filter { $0.state == .sealed }
            if let damaged = sealed.first(where: \.damaged) { return damaged.id }
            guard let sparsest = sealed.min(by: { fraction($0) < fraction($1) }) else { return nil }
            if fraction(sparsest) < configuration.compactionLiveFraction || (overBudget && fraction(sparsest) < 1) || (force && fraction(sparsest) < 1) {
                return sparsest.id
            }
            return nil
        }
    }

    private func fraction(_ segment: Segment) -> Double {
        Double(segment.liveBytes) / Double(max(1, segment.appendOffset - Block.size))
    }

    /// Copies a segment's live records (and still-needed tombstones) to the active segment, then
    /// drops it. Returns false if anything failed (the segment then stays as it was).
    private func compactSegment(_ id: UInt64) -> Bool {
        let plan = state.withLock { s -> (Segment, [IndexEntry])? in
            guard let segment = s.segments[id] else { return nil }
            // A tombstone must outlive every older record of its page, wherever that record is.
            var oldestRecord: [PageAddress: UInt64] = [:]
            for other in s.segments.values where other.id != id {
                for e in other.entries where e.header.kind == .page {
                    oldestRecord[e.header.address] = min(oldestRecord[e.header.address] ?? .max, e.header.sequence)
                }
            }
            let keep = segment.entries.filter { e in
                switch e.header.kind {
                case .page: s.index[e.header.address]?.sequence == e.header.sequence
                case .tombstone: (oldestRecord[e.header.address] ?? .max) <= e.header.deletesSequence
                }
            }
            return (segment, keep)
        }
        guard let (segment, keep) = plan else { return false }
        // Copies go to the writer a group at a time, as they are read. Reading a whole segment's
        // live records first held up to `segmentBytes` at once, and glibc keeps such a peak in
        // the writer thread's arena after it is freed: the soak's daemon grew by hundreds of MB.
        var batch: [PendingWrite] = []
        var batchBytes = 0
        var copied = 0
        for entry in keep {
            let length = Block.roundUp(entry.header.recordBytes)
            let buffer = readBuffers.take(length)
            defer { readBuffers.give(buffer) }
            guard (try? segment.file.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer.bytes[0..<length]), at: entry.offset)) ?? 0
                    >= entry.header.recordBytes,
                  let header = try? PageRecord.verify(UnsafeRawBufferPointer(rebasing: buffer.readOnly[0..<entry.header.recordBytes]),
                                                      format: segment.format),
                  header.sequence == entry.header.sequence
            else {
                logger.error("record failed verification during compaction; dropping it", metadata: [
                    "segment": "\(id)", "offset": "\(entry.offset)",
                ])
                state.withLock { s in
                    s.stats.checksumFailures += 1
                    if s.index[entry.header.address]?.sequence == entry.header.sequence { s.index[entry.header.address] = nil }
                }
                continue
            }
            let record = Array(buffer.readOnly[0..<Block.roundUp(header.recordBytes)])
            let body: PendingWrite.Body = .copy(record, original: header.kind == .page ? header.sequence : nil)
            batch.append(PendingWrite(address: header.address, body: body, createdMicros: header.createdMicros) { _ in })
            batchBytes += record.count
            if batch.count >= configuration.maxGroupRecords || batchBytes >= configuration.compactionBatchBytes {
                guard commitInternal(batch) else { return false }
                copied += batch.count
                batch.removeAll(keepingCapacity: true)
                batchBytes = 0
            }
        }
        guard commitInternal(batch) else { return false }
        copied += batch.count
        // Copies are durable; the old segment can go (a damaged one to quarantine/, kept for
        // inspection: it holds acknowledged records that could not be read).
        state.withLock { s in
            s.segments[id] = nil
            s.stats.compactions += 1
            if segment.damaged { s.manifest.segments.append(Manifest.Segment(id: id, state: .quarantined)) }
        }
        if segment.damaged {
            let name = SegmentHeader.fileName(id)
            do {
                try storage.rename("\(configuration.directory)/\(name)", "\(configuration.directory)/quarantine/\(name)")
                try storage.syncDirectory("\(configuration.directory)/quarantine")
            } catch {
                logger.error("could not move a damaged segment to quarantine/", metadata: ["segment": "\(id)", "error": "\(error)"])
            }
            logger.error("damaged segment quarantined after its readable records were copied", metadata: ["segment": "\(id)"])
        }
        do {
            do {
                try writeManifest()
            } catch {
                // On a full disk even the small manifest may not fit: the dropped segment holds
                // nothing live, so delete it first to make room, then record that.
                try storage.remove("\(configuration.directory)/\(SegmentHeader.fileName(id))")
                try storage.syncDirectory(configuration.directory)
                try writeManifest()
            }
            if storage.exists("\(configuration.directory)/\(SegmentHeader.fileName(id))") {
                try storage.remove("\(configuration.directory)/\(SegmentHeader.fileName(id))")
                try storage.syncDirectory(configuration.directory)
            }
        } catch {
            logger.error("could not remove a compacted segment", metadata: ["segment": "\(id)", "error": "\(error)"])
        }
        logger.info("segment compacted", metadata: ["segment": "\(id)", "recordsCopied": "\(copied)"])
        return true
    }

    /// Commits writer-originated records (evictions, compaction copies) synchronously.
    @discardableResult
    func commitInternal(_ items: [PendingWrite]) -> Bool {
        guard !items.isEmpty else { return true }
        let failed = Mutex(false)
        let tracked = items.map { item in
            var copy = item
            copy.completion = { result in
                if case .failure = result { failed.withLock { $0 = true } }
                item.completion(result)
            }
            return copy
        }
        for chunk in stride(from: 0, to: tracked.count, by: configuration.maxGroupRecords) {
            commitGroup(Array(tracked[chunk..<min(chunk + configuration.maxGroupRecords, tracked.count)]))
        }
        return !failed.withLock { $0 }
    }
}

