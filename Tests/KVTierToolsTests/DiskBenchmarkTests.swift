#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import KVTierCodec
import KVTierCore
import KVTierStore
import KVTierTools
import Testing

@Suite struct DiskBenchmarkTests {
    static func temporaryFolder() throws -> String {
        let path = "/tmp/kvtier-tools-bench-\(UInt64.random(in: 0...UInt64.max))"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    @Test func quickDiskBenchmarkRunsEndToEndAndCleansUp() async throws {
        let parent = try Self.temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: parent) }
        let r = try await DiskBenchmark(codec: Codec(.k4v4), parentDirectory: parent, quick: true).run(logger: diskTestLogger)
        #expect(r.pages == 4)
        #expect(r.restoredPages == r.pages)
        #expect(r.fp16Bytes == 4 * 32 << 20)
        #expect(r.bytesOnDisk > 0 && r.bytesOnDisk < r.fp16Bytes, "k4v4 stores about 5 of 16 bits")
        #expect(r.rawReadBytes == r.bytesOnDisk)
        #expect(r.restoreFp16GBps > 0 && r.rawReadGBps > 0 && r.writeFp16GBps > 0)
        #expect(r.restoreVsRawRead > 0)
        #expect(r.latencyQD1.samples == 4 && r.latencyQD32.samples == 4)
        #expect(r.latencyQD1.p50Micros > 0 && r.latencyQD1.p50Micros <= r.latencyQD1.maxMicros)
        #expect(r.ioPath == "io_uring" || r.ioPath == "pread")
        #expect(!FileManager.default.fileExists(atPath: r.directory), "the benchmark's folder must be removed")
    }

    @Test func losslessPagesComeBackBitExactAndKeepLeavesTheFiles() async throws {
        let parent = try Self.temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: parent) }
        var benchmark = DiskBenchmark(codec: Codec(.fp16, .lz4), parentDirectory: parent, quick: true, keep: true)
        benchmark.pages = 3
        benchmark.shape = PageShape(tokens: 64, layers: 4, kvHeads: 2, headDim: 64)
        let r = try await benchmark.run(logger: diskTestLogger)
        #expect(r.verifiedPages == 3)
        #expect(r.restoredPages == 3)
        #expect(FileManager.default.fileExists(atPath: "\(r.directory)/store/\(Manifest.fileName)"))
        let (inspector, reader) = try DiskInspector.open(r.directory, logger: diskTestLogger)
        defer { reader.close() }
        #expect(try inspector.inspect().report.pages == 3)
    }

    @Test func recoveryBenchmarkRecoversEveryGeneratedPage() async throws {
        let parent = try Self.temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: parent) }
        var benchmark = DiskRecoveryBenchmark(pages: 1000, parentDirectory: parent)
        benchmark.segmentBytes = 1 << 20
        let r = try await benchmark.run(logger: diskTestLogger)
        #expect(r.recoveredPages == 1000)
        #expect(r.pagesPerSegment == 255)
        #expect(r.segments == 4)
        #expect(r.indexBlocksLoaded == 4)
        #expect(r.recoverySeconds > 0 && r.pagesPerSecond > 0)
    }
}
