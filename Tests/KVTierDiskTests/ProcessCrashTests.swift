@preconcurrency import Glibc
import KVTierCore
import KVTierIO
import KVTierStore
import KVTierTools
import Testing

/// SIGKILL a real writer process over and over and check the store it leaves against what it
/// acknowledged. A kill keeps the page cache, so nothing the writer was told is durable may be
/// lost, no deleted page may come back, and nothing on disk may read as damaged.
///
/// Seeded: the seed picks the kill delays, the writers' schedules and the read path of each
/// check, and is printed first. Replay with `KVTIER_CRASH_SEED=<seed> swift test --filter
/// ProcessCrashTests`; thread timing is not replayed, so a rare failure may need a few runs.
/// `KVTIER_CRASH_ITERATIONS` changes the number of kills (default 60).
@Suite(.serialized) struct ProcessCrashTests {
    static let defaultIterations = 60

    @Test func acknowledgedPagesSurviveSIGKILLOfTheWriter() async throws {
        let binary = try Self.binaryOrCancel()
        let seed = Self.environmentNumber("KVTIER_CRASH_SEED") ?? UInt64.random(in: 1...0xFFFF_FFFF)
        let iterations = Int(Self.environmentNumber("KVTIER_CRASH_ITERATIONS") ?? UInt64(Self.defaultIterations))
        print("ProcessCrashTests: seed \(seed), \(iterations) kills (replay: KVTIER_CRASH_SEED=\(seed) swift test --filter ProcessCrashTests)")
        let directory = try TemporaryDirectory("kvtier-crash-\(seed)")
        let ackPath = directory.path + "/acks.log"
        let logPath = directory.path + "/writer.log"
        var random = SplitMix64(seed: seed)
        var totals = (puts: 0, deletes: 0, truncatedBytes: 0, orphans: 0, unacknowledgedPresent: 0)
        let started = ContinuousClock.now
        var failed = false
        var completed = 0

        for iteration in 0..<iterations {
            let writerSeed = random.next()
            let runMillis = 50 + Int(random.next() % 351)
            let choice: ReadPathChoice = iteration % 2 == 0 && ioUringUnavailableReason == nil ? .ioUring : .pread
            let context = "seed \(seed) iteration \(iteration) (writer seed \(writerSeed), killed after \(runMillis) ms, checked via \(choice))"

            let child = try ChildProcess(binary, [
                "debug", "crash-writer", "--dir", directory.path, "--seed", "\(writerSeed)", "--ack-file", ackPath,
                "--codec", "fp16+zstd",
            ], logPath: logPath)
            try await Task.sleep(for: .milliseconds(runMillis))
            if let status = child.exitedOnItsOwn() {
                Issue.record("\(context): crash-writer exited on its own (\(ChildProcess.describe(status))) before the kill:\n\(child.logTail())")
                failed = true
                break
            }
            child.kill()

            let acks = try AckLog(path: ackPath)
            totals.puts = acks.puts
            totals.deletes = acks.deletes
            let tier: DiskTier
            let reader: any BlockReader
            do {
                (tier, reader) = try openTier(root: directory.path, choice: choice)
            } catch {
                Issue.record("\(context): the store does not open after the kill: \(error)")
                failed = true
                break
            }
            let report = tier.recovery
            totals.truncatedBytes += report.truncatedBytes
            totals.orphans += report.orphanSegmentsRemoved
            // A kill tears at most the last write; nothing in the middle of a segment is damaged
            // and the manifest, replaced by rename, is always whole.
            #expect(report.damagedRecords == 0, "\(context): recovery found damaged records: \(report)")
            #expect(!report.manifestRebuilt, "\(context): manifest had to be rebuilt: \(report)")
            let listed = tier.pages()
            #expect(report.pages == listed.count, "\(context): report says \(report.pages) pages, index holds \(listed.count)")

            // DATA LOSS check: every acknowledged, undeleted page must be there, bit-exact.
            let mustExist = acks.state.filter { $0.value == .acknowledged }.keys.sorted().map(CrashTestPage.init(number:))
            for (page, check) in zip(mustExist, await tier.check(mustExist)) where check != .exact {
                Issue.record("DATA LOSS — \(context): acknowledged page \(page.number) reads as \(check)")
                failed = true
            }
            // RESURRECTION check: an acknowledged delete is final.
            for (number, state) in acks.state where state == .deleted && tier.contains(CrashTestPage(number: number).address) {
                Issue.record("DELETED PAGE BACK — \(context): page \(number) was deleted (acknowledged) but is listed")
                failed = true
            }
            // WRONG BYTES check: whatever is listed (acknowledged or not) reads back exactly.
            var pages: [CrashTestPage] = []
            for stored in listed {
                guard let page = CrashTestPage(address: stored.address) else {
                    Issue.record("\(context): a page the writer never wrote is listed: \(stored.address)")
                    failed = true
                    continue
                }
                pages.append(page)
                if acks.state[page.number] == nil { totals.unacknowledgedPresent += 1 }
            }
            for (page, check) in zip(pages, await tier.check(pages)) where check != .exact {
                Issue.record("\(context): listed page \(page.number) reads as \(check)")
                failed = true
            }
            #expect(tier.stats.checksumFailures == 0, "\(context): \(tier.stats.checksumFailures) checksum failures")
            await tier.close()
            reader.close()
            completed += 1
            if failed { break }
        }

        let elapsed = ContinuousClock.now - started
        print("ProcessCrashTests: seed \(seed): \(completed) of \(iterations) kills checked in \(elapsed); \(totals.puts) puts and \(totals.deletes) deletes acknowledged, "
            + "\(totals.truncatedBytes) torn bytes truncated, \(totals.orphans) orphan segments removed, "
            + "\(totals.unacknowledgedPresent) unacknowledged pages found (allowed)")
        // A run that acknowledged nothing checked nothing.
        #expect(totals.puts >= iterations, "seed \(seed): only \(totals.puts) puts acknowledged in \(iterations) runs; the writer is not writing")
        #expect(totals.deletes > 0, "seed \(seed): no deletes acknowledged; the delete path went untested")
        if failed {
            print("ProcessCrashTests: kept \(directory.path) (acks.log, writer.log, store/) for inspection")
        } else {
            directory.remove()
        }
    }

    /// The writer and this test must agree on `CrashTestPage`: a clean run of the writer is read back.
    @Test func crashPageMatchesTheWriter() async throws {
        let binary = try Self.binaryOrCancel()
        let directory = try TemporaryDirectory("kvtier-crashpage")
        defer { directory.remove() }
        let child = try ChildProcess(binary, [
            "debug", "crash-writer", "--dir", directory.path, "--seed", "1", "--ack-file", directory.path + "/acks.log",
            "--first-page", "1000", "--puts", "6", "--concurrency", "1", "--max-live", "100",
        ], logPath: directory.path + "/writer.log")
        let status = child.wait()
        try #require(status == 0, "crash-writer --puts 6 failed (\(ChildProcess.describe(status))):\n\(child.logTail())")
        let acks = try AckLog(path: directory.path + "/acks.log")
        #expect(acks.puts == 6)
        let (tier, reader) = try openTier(root: directory.path, choice: .pread)
        defer { reader.close() }
        let live = acks.state.filter { $0.value == .acknowledged }.keys.sorted().map(CrashTestPage.init(number:))
        #expect(!live.isEmpty)
        #expect(live.allSatisfy { (1000..<1006).contains($0.number) })
        for (page, check) in zip(live, await tier.check(live)) {
            #expect(check == .exact, "page \(page.number) written by the kvtier binary reads as \(check): CrashTestPage definitions differ?")
        }
        await tier.close()
    }

    static func binaryOrCancel() throws -> String {
        let (path, searched) = KVTierBinary.locate()
        guard let path else {
            let why = "the kvtier executable was not found (build it with `swift build`, or set \(KVTierBinary.environmentVariable)); looked at: \(searched.joined(separator: ", "))"
            print("ProcessCrashTests skipped: \(why)")
            try Test.cancel(Comment(rawValue: why))
        }
        return path
    }

    static func environmentNumber(_ name: String) -> UInt64? {
        getenv(name).flatMap { UInt64(String(cString: $0)) }
    }
}

/// The crash-writer's acknowledgement log, replayed in order.
struct AckLog {
    enum PageState: Equatable {
        /// `put N`: durable and must be readable.
        case acknowledged
        /// `deleting N` without `del N`: the delete may or may not have reached the disk.
        case deleting
        /// `del N`: must be gone.
        case deleted
    }

    var state: [UInt64: PageState] = [:]
    var puts = 0
    var deletes = 0

    init(path: String) throws {
        guard let bytes = readWholeFile(path) else { return }
        for line in bytes.split(separator: UInt8(ascii: "\n")) {
            let text = String(decoding: line, as: UTF8.self)
            let fields = text.split(separator: " ")
            guard fields.count == 2, let number = UInt64(fields[1]) else { throw TestFailure("ack log line '\(text)' is malformed") }
            switch fields[0] {
            case "put":
                state[number] = .acknowledged
                puts += 1
            case "deleting": state[number] = .deleting
            case "del":
                state[number] = .deleted
                deletes += 1
            default: throw TestFailure("ack log line '\(text)' is malformed")
            }
        }
    }
}

