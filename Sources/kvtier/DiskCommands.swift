@preconcurrency import Glibc
import ArgumentParser
import KVTierCodec
import KVTierCore
import KVTierIO
import KVTierStore
import KVTierTools
import Logging

/// `kvtier verify DIR`: reads every record of a store and checks it against the format.
struct DiskVerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check every record, index block and the manifest of a disk store (read-only).",
        discussion: """
            DIR is the store folder (holding MANIFEST and seg-*.kvs) or the state directory that \
            contains store/. Nothing is modified: safe while the daemon runs. Exit status 0 when \
            nothing is corrupt, 1 otherwise. A torn tail of the active segment (a write that was \
            never acknowledged) and orphan segments are reported but are not corruption.
            """
    )

    @Argument(help: "Store folder, or the state directory containing store/.") var directory: String
    @Flag(help: "Print the report as JSON.") var json = false

    func run() throws {
        let logger = commandLogger()
        let (inspector, reader) = try DiskInspector.open(directory, logger: logger)
        defer { reader.close() }
        let inspection = try withProgress("verifying") { try inspector.inspect(progress: $0) }
        let r = inspection.report
        if json {
            try printJSON(r)
        } else {
            printVerifyTable(r)
        }
        if !r.ok { throw ExitCode(1) }
    }

    func printVerifyTable(_ r: DiskVerifyReport) {
        let manifest = r.manifest.valid ? "valid, epoch \(r.manifest.epoch), \(r.manifest.entries) entries"
            : (r.manifest.present ? "DAMAGED" : "missing")
        printTable(["CHECK", "RESULT"], [
            ["store", r.directory],
            ["store id", r.storeID ?? "unknown"],
            ["manifest", manifest],
            ["segments", "\(r.segments) (\(r.sealedSegments) sealed)"],
            ["records", "\(r.records) (\(r.pageRecords) pages, \(r.tombstones) tombstones)"],
            ["live pages", "\(r.pages) (\(ByteCount(r.liveBytes)))"],
            ["files read", ByteCount(r.fileBytes).description],
            ["torn tail", "\(r.tornTailBytes) bytes"],
            ["orphan segments", "\(r.orphanSegments)"],
            ["quarantine", "\(r.quarantine.segments) segments, \(r.quarantine.records) records, \(r.quarantine.corruptRecords) damaged"],
            ["corrupt records", "\(r.corruptRecords)"],
            ["corrupt index blocks", "\(r.corruptIndexBlocks)"],
            ["corrupt segment headers", "\(r.corruptSegments)"],
            ["corrupt manifest", "\(r.corruptManifest)"],
            ["missing segments", "\(r.missingSegments)"],
            ["sequence errors", "\(r.sequenceErrors)"],
            ["verdict", r.ok ? "OK" : "CORRUPT (\(r.corrupt))"],
        ])
        if !r.problems.isEmpty {
            print("")
            for problem in r.problems { print("- \(problem)") }
        }
    }
}

/// `kvtier pages DIR`: the live pages of a disk store, each record read and checked (the offline
/// half of `PagesCommand`).
enum OfflinePages {
    static func run(directory: String, json: Bool) throws {
        let logger = commandLogger()
        let (inspector, reader) = try DiskInspector.open(directory, logger: logger)
        defer { reader.close() }
        let inspection = try withProgress("reading") { try inspector.inspect(progress: $0) }
        if !inspection.report.ok {
            fputs("warning: the store has \(inspection.report.corrupt) corrupt items; run 'kvtier verify' for details\n", stderr)
        }
        if json { return try printJSON(inspection.pages) }
        printTable(["KEY", "TENANT", "MODEL", "TOKENS", "LAYERS", "CODEC", "DISK", "SEGMENT", "OFFSET", "SEQUENCE"],
                   inspection.pages.map {
                       [$0.key, "\($0.tenant)", $0.modelID, "\($0.tokens)", "\($0.layers)", $0.codec,
                        ByteCount($0.diskBytes).description, "\($0.segment)", "\($0.offset)", "\($0.sequence)"]
                   })
    }
}

/// `kvtier bench disk|recovery|trace|serve|resume|put|remote`.
struct DiskBenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Benchmark kvtierd on this machine: disk tier, recovery, serving, puts, resume, trace replay, remote tier.",
        subcommands: [Disk.self, Recovery.self, TraceBenchCommand.self, ServeBenchCommand.self, ServeWorkerCommand.self, ResumeBenchCommand.self, PutBenchCommand.self, RemoteBenchCommand.self]
    )

    struct Disk: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Write Llama-3-8B-shaped pages, then restore them cold against raw sequential reads.",
            discussion: """
                Makes DIR/kvtier-bench-<random>, writes 32 pages of 32 layers × [256, 8, 128] \
                float16 (1 GiB of fp16 KV; --quick: 4 pages) through a disk tier, drops them from the \
                page cache and restores them all with one batched read (read, checksum, decode). The \
                baseline is the same files read sequentially with O_DIRECT, 4 MiB at a time. Set \
                KVTIER_IO_URING=off to measure the pread fallback.
                """
        )

        @Option(help: "Folder to benchmark in (its file system is what is measured).") var dir: String
        @Option(help: "Codec name (see 'kvtier codec list').") var codec: String
        @Flag(help: "Leave the benchmark's folder and its segment files in place.") var keep = false
        @Flag(help: "4 pages instead of 32: a smoke test of a few seconds.") var quick = false
        @Flag(help: "Print the report as JSON.") var json = false

        func run() async throws {
            let codec: Codec
            do { codec = try Codec(name: self.codec) } catch { throw ValidationError("\(error)") }
            let benchmark = DiskBenchmark(codec: codec, parentDirectory: dir, quick: quick, keep: keep)
            let logger = commandLogger()
            let r = try await benchmark.run(logger: logger)
            if json { return try printJSON(r) }
            func gbps(_ v: Double) -> String { formatDecimal(v, places: 2) + " GB/s" }
            func lat(_ l: DiskBenchmark.Latency) -> String {
                "p50 \(l.p50Micros) µs, p90 \(l.p90Micros), p99 \(l.p99Micros), max \(l.maxMicros) (\(l.samples) pages)"
            }
            printTable(["MEASURE", "VALUE"], [
                ["codec", r.codec],
                ["pages", "\(r.pages) × \(r.pageShape) (\(ByteCount(r.fp16Bytes)) fp16)"],
                ["on disk", "\(ByteCount(r.bytesOnDisk)) (\(formatDecimal(r.storedBitsPerElement, places: 2)) bits/element)"],
                ["write", gbps(r.writeFp16GBps) + " fp16"],
                ["restore", gbps(r.restoreFp16GBps) + " fp16 (\(gbps(r.restoreDiskGBps)) from disk)"],
                ["raw sequential read", gbps(r.rawReadGBps)],
                ["restore / raw read", formatDecimal(r.restoreVsRawRead, places: 2) + "×"],
                ["latency QD1", lat(r.latencyQD1)],
                ["latency QD32", lat(r.latencyQD32)],
                ["I/O path", r.ioPathDetail + (r.ioFallbackReason.map { " (\($0))" } ?? "")],
                ["folder", r.directory + (r.kept ? " (kept)" : " (removed)")],
            ])
        }
    }

    struct Recovery: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Time start-up recovery of a store holding many pages.",
            discussion: """
                Makes DIR/kvtier-bench-recovery-<random> holding N tiny pages in sealed 256 MiB \
                segments (sparse files: only headers and index blocks are written), drops them from \
                the page cache and times opening the disk tier.
                """
        )

        @Option(help: "Folder to benchmark in.") var dir: String
        @Option(help: "Pages in the store.") var pages = 1_000_000
        @Flag(help: "Leave the generated store in place.") var keep = false
        @Flag(help: "Print the report as JSON.") var json = false

        func run() async throws {
            let benchmark = DiskRecoveryBenchmark(pages: pages, parentDirectory: dir, keep: keep)
            let logger = commandLogger()
            let r = try await benchmark.run(logger: logger)
            if json { return try printJSON(r) }
            printTable(["MEASURE", "VALUE"], [
                ["pages", "\(r.pages) in \(r.segments) sealed segments (+1 active)"],
                ["index blocks", ByteCount(r.indexBytes).description],
                ["recovery (cold)", formatDecimal(r.recoverySeconds, places: 3) + " s (\(Int(r.pagesPerSecond)) pages/s)"],
                ["recovery (as it reports)", formatDecimal(r.recoveryReportedSeconds, places: 3) + " s"],
                ["recovery (warm)", formatDecimal(r.warmRecoverySeconds, places: 3) + " s"],
                ["folder", r.directory + (r.kept ? " (kept)" : " (removed)")],
            ])
        }
    }
}

/// Warnings and errors on standard error, so they never mix with JSON on standard output.
private func commandLogger() -> Logger {
    var logger = Logger(label: "kvtier", factory: { StreamLogHandler.standardError(label: $0) })
    logger.logLevel = .warning
    return logger
}

/// Runs `body` with a progress callback that keeps one `\r` line on standard error, shown only
/// when standard error is a terminal and the work has taken more than a second.
private func withProgress<T>(_ verb: String, _ body: ((DiskInspectionProgress) -> Void) throws -> T) rethrows -> T {
    guard isatty(STDERR_FILENO) == 1 else { return try body { _ in } }
    let started = Clocks.monotonicNanoseconds()
    var shown = false
    defer { if shown { fputs("\r\u{1B}[K", stderr) } }
    return try body { p in
        guard Clocks.monotonicNanoseconds() - started > 1_000_000_000 || shown else { return }
        shown = true
        fputs("\r\(verb) segment \(p.segmentsDone)/\(p.segments), \(ByteCount(p.bytesDone)) of \(ByteCount(p.bytes))\u{1B}[K", stderr)
    }
}
