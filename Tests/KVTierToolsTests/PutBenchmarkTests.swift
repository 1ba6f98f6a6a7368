@preconcurrency import Glibc
import KVTierTools
import Testing

/// `kvtier bench put` end to end at a tiny size on the debug build of kvtierd: skipped when it is
/// not built.
@Suite struct PutBenchmarkTests {
    static let daemon: String = {
        var path = #filePath
        for _ in 0..<3 { path = String(path[..<path.lastIndex(of: "/")!]) }
        return path + "/.build/debug/kvtierd"
    }()
    static let built = access(daemon, X_OK) == 0

    @Test(.enabled(if: built, "kvtierd is not built in .build/debug (swift build --product kvtierd)"))
    func everyScenarioAtATinySize() async throws {
        var benchmark = PutBenchmark(daemonPath: Self.daemon)
        benchmark.pageTokens = 16  // 64 KiB pages
        benchmark.prefixPages = 4
        benchmark.puts = 3
        benchmark.fullBudgetPrefixes = 2
        benchmark.durablePages = [2, 4]
        benchmark.durableRepetitions = 2
        let r = try await benchmark.run()
        #expect(r.pageBytes == 64 << 10 && r.prefixBytes == 4 * (64 << 10))
        #expect(r.ram.map(\.configuration) == ["fits", "full"])
        for phase in r.ram {
            #expect(phase.puts == 3 && phase.bytes == 3 * r.prefixBytes)
            #expect(phase.gbps > 0 && phase.memcpyGBps > 0 && phase.vsMemcpy > 0)
            #expect(phase.p50Millis > 0 && phase.p50Millis <= phase.p99Millis)
        }
        #expect(r.ram[0].evictions == 0, "the 'fits' budget holds every timed put")
        #expect(r.ram[1].evictions >= 3 * 4 / 2, "every put into the full budget evicts older pages")
        #expect(r.durable.map(\.pages) == [2, 4])
        for phase in r.durable {
            #expect(phase.repetitions == 2 && phase.encodedBytes > 0)
            #expect(phase.plainP50Millis > 0 && phase.durableP50Millis > 0 && phase.sessionP50Millis > 0 && phase.writeSyncP50Millis > 0)
            #expect(phase.durableP50Millis <= phase.durableP99Millis && phase.writeSyncP50Millis <= phase.writeSyncP99Millis)
            #expect(phase.durableVsWriteSync > 0 && phase.sessionVsWriteSync > 0)
            // k4v4 stores a page in well under its fp16 size.
            #expect(phase.encodedBytes < phase.pages * r.pageBytes)
        }
        #expect(r.durable[1].encodedBytes > r.durable[0].encodedBytes)
    }

    @Test func refusesAMissingDaemon() async throws {
        let benchmark = PutBenchmark(daemonPath: "/nonexistent/kvtierd")
        await #expect(throws: ToolError.self) { try await benchmark.run() }
    }
}
