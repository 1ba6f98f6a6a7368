@preconcurrency import Glibc
import KVTierCore
import KVTierStore
import KVTierTools
import Testing

/// The disk tier on real files (ext4 or whatever /tmp is): both read paths agree, bit rot is a
/// miss, and a clean close loses nothing.
@Suite struct PosixDiskTierTests {
    static func configuration() -> DiskTierConfiguration {
        var configuration = DiskTierConfiguration()
        // Several sealed segments (index blocks) plus an active one.
        configuration.segmentBytes = 256 << 10
        return configuration
    }

    static let pages = (0..<40).map { CrashTestPage(number: UInt64(5000 + $0)) }

    /// Writes `pages` into a fresh store and closes it; returns its directory.
    static func populatedStore() async throws -> TemporaryDirectory {
        let directory = try TemporaryDirectory("kvtier-posix-tier")
        let (tier, reader) = try openTier(root: directory.path, choice: .pread, configuration: configuration())
        defer { reader.close() }
        for page in pages { try await tier.write(page) }
        await tier.close()
        return directory
    }

    @Test func bothReadPathsReadTheSameBytesAndAReopenFindsEverything() async throws {
        let directory = try await Self.populatedStore()
        defer { directory.remove() }
        var seen: [ReadPathChoice: [[UInt8]]] = [:]
        for choice in ReadPathChoice.allCases {
            if choice == .ioUring, let why = ioUringUnavailableReason {
                print("PosixDiskTierTests: io_uring half skipped: \(why)")
                continue
            }
            let (tier, reader) = try openTier(root: directory.path, choice: choice, configuration: Self.configuration())
            defer { reader.close() }
            #expect(tier.readPath.contains(choice == .ioUring ? "io_uring" : "pread"), "\(choice): reads via \(tier.readPath)")
            let report = tier.recovery
            #expect(report.pages == Self.pages.count, "\(choice): \(report)")
            #expect(report.segments > 2, "\(choice): expected several segments: \(report)")
            #expect(report.indexBlocksLoaded > 0, "\(choice): sealed segments should load from index blocks: \(report)")
            #expect(report.truncatedBytes == 0 && report.damagedRecords == 0 && !report.manifestRebuilt, "\(choice): \(report)")
            let results = await tier.read(Self.pages.map(\.address))
            var bytes: [[UInt8]] = []
            for (page, result) in zip(Self.pages, results) {
                let check = PageCheck(result, expected: page)
                #expect(check == .exact, "\(choice): page \(page.number) reads as \(check)")
                if case .success(let got) = result { bytes.append(got.data.copyBytes()) }
            }
            seen[choice] = bytes
            #expect(tier.stats.checksumFailures == 0)
            await tier.close()
        }
        if let uring = seen[.ioUring], let pread = seen[.pread] {
            #expect(uring == pread, "io_uring and pread returned different bytes")
        }
    }

    @Test(arguments: ReadPathChoice.allCases)
    func aFlippedBitIsAMissNeverBytes(choice: ReadPathChoice) async throws {
        if choice == .ioUring, let why = ioUringUnavailableReason {
            print("PosixDiskTierTests: io_uring skipped: \(why)")
            try Test.cancel(Comment(rawValue: why))
        }
        let directory = try await Self.populatedStore()
        defer { directory.remove() }
        var (tier, reader) = try openTier(root: directory.path, choice: choice, configuration: Self.configuration())
        defer { reader.close() }

        // Rot one byte in the payload of a page in a sealed segment and one in the header of a
        // page in another segment, with plain buffered writes behind the tier's back.
        let byNumber = Dictionary(uniqueKeysWithValues: tier.pages().map { (CrashTestPage(address: $0.address)!.number, $0) })
        let first = Self.pages[3]
        let firstStored = try #require(byNumber[first.number])
        let second = try #require(Self.pages.first { byNumber[$0.number]!.segment != firstStored.segment })
        let secondStored = byNumber[second.number]!
        let storeDirectory = "\(directory.path)/\(Self.configuration().directory)"
        try flipBits(in: "\(storeDirectory)/\(SegmentHeader.fileName(firstStored.segment))",
                     at: firstStored.offset + firstStored.recordBytes - 7)
        try flipBits(in: "\(storeDirectory)/\(SegmentHeader.fileName(secondStored.segment))",
                     at: secondStored.offset + 57, mask: 0x01)  // the token count

        for page in [first, second] {
            switch await tier.read(page.address) {
            case .success(let got):
                Issue.record("\(choice): a rotten page \(page.number) was served (\(got.data.count) bytes) instead of a miss")
            case .failure(let miss):
                guard case .damaged = miss else {
                    Issue.record("\(choice): rotten page \(page.number) should be .damaged, got \(miss)")
                    continue
                }
            }
        }
        #expect(tier.stats.checksumFailures == 2, "\(choice): \(tier.stats)")
        #expect(tier.stats.readMisses >= 2)
        // The damaged records are forgotten; the rest are untouched.
        #expect(!tier.contains(first.address) && !tier.contains(second.address))
        let rest = Self.pages.filter { $0.number != first.number && $0.number != second.number }
        for (page, check) in zip(rest, await tier.check(rest)) {
            #expect(check == .exact, "\(choice): intact page \(page.number) reads as \(check)")
        }

        // After a restart the rot is still only ever a miss (an index block lists the page again;
        // the read catches it).
        await tier.close()
        reader.close()
        (tier, reader) = try openTier(root: directory.path, choice: choice, configuration: Self.configuration())
        for page in [first, second] {
            if case .success = await tier.read(page.address) {
                Issue.record("\(choice): after restart a rotten page \(page.number) was served")
            }
        }
        for (page, check) in zip(rest, await tier.check(rest)) {
            #expect(check == .exact, "\(choice): after restart intact page \(page.number) reads as \(check)")
        }
        await tier.close()
    }
}
