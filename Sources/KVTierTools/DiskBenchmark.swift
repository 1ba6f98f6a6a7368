#if canImport(Glibc)
@preconcurrency import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Histogram
import KVTierCodec
import KVTierCore
import KVTierIO
import KVTierStore
import Logging

/// Writes realistic pages through a `DiskTier` on real files, drops them from the page cache, and
/// restores them: fp16 bytes delivered per second (read, verify and decode) against plain
/// sequential O_DIRECT reads of the same files measured in the same run. The engine of
/// `kvtier bench disk`.
public struct DiskBenchmark: Sendable {
    public struct Latency: Codable, Sendable, Equatable {
        /// Page reads in flight while sampling.
        public var queueDepth: Int
        public var samples: Int
        public var p50Micros: UInt64
        public var p90Micros: UInt64
        public var p99Micros: UInt64
        public var maxMicros: UInt64
        public var meanMicros: Double
    }

    public struct Report: Codable, Sendable {
        public var codec: String
        public var pages: Int
        /// e.g. "32×[256, 8, 128] float16".
        public var pageShape: String
        /// fp16 bytes of one page (keys and values of every layer).
        public var pageFp16Bytes: Int
        /// fp16 bytes of all pages.
        public var fp16Bytes: Int
        /// Segment files after the writes: headers, records with block padding, index blocks.
        public var bytesOnDisk: Int
        /// Record bytes × 8 per stored element (headers and section tables included, padding not).
        public var storedBitsPerElement: Double
        /// fp16 bytes accepted per second by `DiskTier.write` (encode, append, fdatasync).
        public var writeFp16GBps: Double
        public var writeSeconds: Double
        /// fp16 bytes delivered per second by `DiskTier.read([...])` from a cold cache (read,
        /// checksum, decode), wall clock; median of the rounds.
        public var restoreFp16GBps: Double
        public var restoreSeconds: Double
        /// Record bytes read from disk per second during the restore.
        public var restoreDiskGBps: Double
        /// Every round's figure; the reported ones are the medians.
        public var restoreFp16GBpsRounds: [Double]
        public var rawReadGBpsRounds: [Double]
        /// Plain sequential O_DIRECT reads of the same segment files, 4 MiB each, one at a time;
        /// median of the rounds, each right after a restore round.
        public var rawReadGBps: Double
        public var rawReadBytes: Int
        public var rawReadSeconds: Double
        /// restoreFp16GBps / rawReadGBps: how much faster KV arrives than the disk's raw bandwidth.
        public var restoreVsRawRead: Double
        /// Pages `read([...])` returned; equals `pages` unless a read failed.
        public var restoredPages: Int
        /// Pages compared byte for byte with what was written (lossless codecs only).
        public var verifiedPages: Int
        /// Reads in flight during the restore (`DiskTierConfiguration.readConcurrency`).
        public var readConcurrency: Int
        /// "io_uring" or "pread".
        public var ioPath: String
        /// e.g. "io_uring qd=64" or "pread pool (4 threads)".
        public var ioPathDetail: String
        /// Why io_uring is not used, when it is not.
        public var ioFallbackReason: String?
        public var latencyQD1: Latency
        public var latencyQD32: Latency
        public var cpuCores: Int
        /// The benchmark's own folder (removed at the end unless kept).
        public var directory: String
        public var kept: Bool
    }

    /// One page of Llama-3-8B: 32 layers × [256 tokens, 8 KV heads, 128] float16, 32 MiB.
    public static let llama3Page = PageShape(tokens: 256, layers: 32, kvHeads: 8, headDim: 128)
    /// Requests of the raw-read baseline.
    public static let rawReadBytesPerRequest = 4 << 20

    public var codec: Codec
    /// Where the benchmark makes its folder `kvtier-bench-<random>`.
    public var parentDirectory: String
    public var pages: Int
    public var shape: PageShape
    /// Pages generated; the others reuse their data under other keys.
    public var distinctPages: Int
    /// Sections generated; pages are put together from them in different orders.
    public var distinctSections: Int
    /// Passes over all pages for the queue-depth-1 and queue-depth-32 latency samples.
    public var latencyPassesQD1: Int
    public var latencyPassesQD32: Int
    /// Interleaved restore and raw-read rounds.
    public var rounds: Int
    public var writesInFlight = 4
    public var readConcurrency = 32
    public var keep: Bool

    /// The default run: 32 pages (1 GiB of fp16 KV); `quick`: 4 pages, one latency pass.
    public init(codec: Codec, parentDirectory: String, quick: Bool = false, keep: Bool = false) {
        self.codec = codec
        self.parentDirectory = parentDirectory
        self.pages = quick ? 4 : 32
        self.shape = Self.llama3Page
        self.distinctPages = quick ? 2 : 4
        self.distinctSections = quick ? 4 : 8
        self.latencyPassesQD1 = quick ? 1 : 2
        self.latencyPassesQD32 = quick ? 1 : 4
        self.rounds = quick ? 1 : 3
        self.keep = keep
    }

    public func run(logger: Logger) async throws -> Report {
        guard pages >= 1, distinctPages >= 1, distinctSections >= 1 else { throw ToolError("pages, distinct pages and sections must be at least 1") }
        try codec.quantizer.check(shape.section)
        var random = SystemRandomNumberGenerator()
        let runID = random.next() as UInt64
        let root = "\(parentDirectory.hasSuffix("/") ? String(parentDirectory.dropLast()) : parentDirectory)/kvtier-bench-\(PageKey.hex(runID))"
        let selection = try BlockReaders.make(logger: logger)
        defer {
            selection.reader.close()
            if !keep { try? FileManager.default.removeItem(atPath: root) }
        }
        let storage = PosixStorage(root: root, reader: selection.reader, logger: logger)
        try storage.makeDirectory("")
        var configuration = DiskTierConfiguration()
        configuration.readConcurrency = readConcurrency
        let tier = try DiskTier(storage: storage, configuration: configuration, logger: logger)

        let sources = makePages()
        let addresses = (0..<pages).map { PageAddress(tenant: TenantID(1000), key: PageKey(high: runID, low: UInt64($0))) }
        let modelID: UInt64 = 0x11A3_A008_B000_0001

        // Writes, a few in flight so encoding overlaps the writer's appends and syncs.
        let writeStart = Clocks.monotonicNanoseconds()
        var recordBytes = 0
        try await withThrowingTaskGroup(of: Int.self) { group in
            var next = 0
            func launch() {
                let i = next
                next += 1
                group.addTask {
                    try await tier.write(addresses[i], modelID: modelID, codec: codec, shape: shape, data: sources[i % sources.count]).recordBytes
                }
            }
            while next < min(pages, writesInFlight) { launch() }
            while let written = try await group.next() {
                recordBytes += written
                if next < pages { launch() }
            }
        }
        let writeSeconds = seconds(since: writeStart)

        let segmentFiles = try storage.list(configuration.directory).filter { SegmentHeader.id(fromFileName: $0) != nil }.sorted()
            .map { "\(configuration.directory)/\($0)" }
        var bytesOnDisk = 0
        for path in segmentFiles { bytesOnDisk += try storage.open(path, .read).size() }

        // Restore everything from a cold cache, as a prefill that hits the disk tier would, and
        // read the same files raw; interleaved rounds, medians reported, because a shared
        // virtual disk's bandwidth moves from one second to the next.
        // Decode into memory allocated (and faulted in) once, as the daemon's RAM tier or a
        // client's pinned staging memory would be: fresh multi-MiB buffers per page would
        // measure the kernel's page zeroing instead of the disk tier.
        let destinations = addresses.map { _ in PageBuffer(byteCount: shape.rawBytes) }
        var restoreRounds: [Double] = []
        var rawRounds: [Double] = []
        var restoredPages = 0
        var verifiedPages = 0
        var restoreDiskBytes = 0
        var rawBytes = 0
        for round in 0..<max(1, rounds) {
            try dropCache(root, segmentFiles)
            let restoreStart = Clocks.monotonicNanoseconds()
            let restored = await tier.read(addresses, into: destinations)
            restoreRounds.append(seconds(since: restoreStart))
            if round == 0 {
                for (i, result) in restored.enumerated() {
                    guard case .success(let page) = result else {
                        logger.error("benchmark page could not be restored", metadata: ["page": "\(addresses[i])", "miss": "\(result)"])
                        continue
                    }
                    restoredPages += 1
                    restoreDiskBytes += page.page.diskBytes
                    if codec.isLossless {
                        let source = sources[i % sources.count]
                        if memcmp(page.data.bytes.baseAddress!, source.bytes.baseAddress!, shape.rawBytes) == 0 { verifiedPages += 1 }
                    }
                }
                guard restoredPages == pages else { throw ToolError("only \(restoredPages) of \(pages) pages came back from disk; see the log") }
                guard !codec.isLossless || verifiedPages == pages else {
                    throw ToolError("\(pages - verifiedPages) of \(pages) lossless pages came back with different bytes")
                }
            }
            // The baseline: the same files read start to end, one 4 MiB O_DIRECT read at a time.
            try dropCache(root, segmentFiles)
            let raw = try await rawRead(storage, segmentFiles)
            rawBytes = raw.bytes
            rawRounds.append(raw.seconds)
        }
        let restoreSeconds = Self.median(restoreRounds)
        let rawSeconds = Self.median(rawRounds)

        let qd1 = try await latency(tier, addresses, queueDepth: 1, passes: latencyPassesQD1)
        let qd32 = try await latency(tier, addresses, queueDepth: 32, passes: latencyPassesQD32)
        await tier.close()

        let fp16Bytes = pages * shape.rawBytes
        let restoreGBps = Double(fp16Bytes) / restoreSeconds / 1e9
        let rawGBps = Double(rawBytes) / rawSeconds / 1e9
        let elements = Double(pages) * Double(shape.rawBytes / shape.elementType.byteWidth)
        let path: String = if case .ioUring = selection.reader.path { "io_uring" } else { "pread" }
        return Report(
            codec: codec.name, pages: pages, pageShape: shape.description, pageFp16Bytes: shape.rawBytes, fp16Bytes: fp16Bytes,
            bytesOnDisk: bytesOnDisk, storedBitsPerElement: Double(recordBytes) * 8 / elements,
            writeFp16GBps: Double(fp16Bytes) / writeSeconds / 1e9, writeSeconds: writeSeconds,
            restoreFp16GBps: restoreGBps, restoreSeconds: restoreSeconds,
            restoreDiskGBps: Double(restoreDiskBytes) / restoreSeconds / 1e9,
            restoreFp16GBpsRounds: restoreRounds.map { Double(fp16Bytes) / $0 / 1e9 },
            rawReadGBpsRounds: rawRounds.map { Double(rawBytes) / $0 / 1e9 },
            rawReadGBps: rawGBps, rawReadBytes: rawBytes, rawReadSeconds: rawSeconds, restoreVsRawRead: restoreGBps / rawGBps,
            restoredPages: restoredPages, verifiedPages: verifiedPages, readConcurrency: readConcurrency,
            ioPath: path, ioPathDetail: selection.reader.path.description,
            ioFallbackReason: selection.fallbackReason.map { "\($0)" },
            latencyQD1: qd1, latencyQD32: qd32, cpuCores: ProcessInfo.processInfo.activeProcessorCount,
            directory: root, kept: keep)
    }

    /// `distinctPages` pages put together from `distinctSections` generated sections, each page
    /// using them in its own order: realistic statistics at a fraction of the generation time.
    func makePages() -> [PageBuffer] {
        let section = shape.section
        let part = section.bytesPerPart
        let generated = (0..<distinctSections).map { SyntheticKV.section(section, seed: 0xD15C + UInt64($0)) }
        return (0..<min(distinctPages, pages)).map { p in
            let page = PageBuffer(overwrittenByteCount: shape.rawBytes)
            for layer in 0..<shape.layers {
                let (keys, values) = generated[(layer * 3 + p * 5) % generated.count]
                let base = layer * 2 * part
                keys.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: page.bytes[base..<base + part]).copyMemory(from: $0) }
                values.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: page.bytes[base + part..<base + 2 * part]).copyMemory(from: $0) }
            }
            return page
        }
    }

    /// Drops the files' pages from the page cache. The tier syncs every group before it returns,
    /// so nothing is dirty and everything can go.
    func dropCache(_ root: String, _ paths: [String]) throws {
        for path in paths {
            let file = try SegmentFile(forReadingAt: .init("\(root)/\(path)"), preferDirect: false)
            try file.dropCachedPages()
        }
    }

    func rawRead(_ storage: PosixStorage, _ paths: [String]) async throws -> (bytes: Int, seconds: Double) {
        let buffer = PageBuffer(byteCount: Self.rawReadBytesPerRequest)
        var bytes = 0
        let start = Clocks.monotonicNanoseconds()
        for path in paths {
            let file = try storage.open(path, .read)
            let size = try file.size()
            var offset = 0
            while offset < size {
                let got = try await storage.read([BlockRead(file: file, offset: offset, destination: buffer.bytes)])[0].get()
                guard got > 0 else { break }
                bytes += got
                offset += got
            }
        }
        return (bytes, seconds(since: start))
    }

    /// Per-page restore latency, issue to decoded, with `queueDepth` page reads kept in flight.
    func latency(_ tier: DiskTier, _ addresses: [PageAddress], queueDepth: Int, passes: Int) async throws -> Latency {
        var histogram = Histogram<UInt64>(highestTrackableValue: 600_000_000, numberOfSignificantValueDigits: .three)
        let samples = addresses.count * max(1, passes)
        let shape = self.shape
        // One reused destination per read in flight (see the restore above).
        let slots = (0..<max(1, queueDepth)).map { _ in PageBuffer(byteCount: shape.rawBytes) }
        let failures = await withTaskGroup(of: (UInt64, Bool, Int).self) { group -> Int in
            var next = 0
            var failures = 0
            func launch(_ slot: Int) {
                let address = addresses[next % addresses.count]
                next += 1
                group.addTask {
                    let start = Clocks.monotonicNanoseconds()
                    let result = await tier.read(address, into: slots[slot])
                    let micros = (Clocks.monotonicNanoseconds() - start) / 1000
                    if case .success = result { return (micros, true, slot) }
                    return (micros, false, slot)
                }
            }
            for slot in 0..<min(samples, slots.count) { launch(slot) }
            while let (micros, ok, slot) = await group.next() {
                if ok { _ = histogram.record(micros) } else { failures += 1 }
                if next < samples { launch(slot) }
            }
            return failures
        }
        guard failures == 0 else { throw ToolError("\(failures) page reads failed while sampling latency; see the log") }
        return Latency(queueDepth: queueDepth, samples: Int(histogram.totalCount), p50Micros: histogram.valueAtPercentile(50),
                       p90Micros: histogram.valueAtPercentile(90), p99Micros: histogram.valueAtPercentile(99),
                       maxMicros: histogram.max, meanMicros: histogram.mean)
    }

    static func median(_ values: [Double]) -> Double {
        let sorted = values.sorted()
        return sorted.count % 2 == 1 ? sorted[sorted.count / 2] : (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
    }

    func seconds(since start: UInt64) -> Double { Double(Clocks.monotonicNanoseconds() - start) / 1e9 }
}
