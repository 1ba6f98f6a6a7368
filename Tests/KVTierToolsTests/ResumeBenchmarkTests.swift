@preconcurrency import Glibc
import KVTierTools
import Testing

/// `kvtier bench resume` end to end on the debug kvtierd (skipped when it is not built).
@Suite struct ResumeBenchmarkTests {
    @Test(.enabled(if: ServeBenchmarkTests.built, "kvtierd and kvtier are not built in .build/debug (swift build)"))
    func aSmallRunLoadsAndServesEverySession() async throws {
        var options = ResumeBenchmark.Options(daemonPath: ServeBenchmarkTests.daemon)
        options.sessions = 2
        options.tokensPerSession = 600
        options.layers = 2
        options.thinkMillis = [0, 30]
        options.rounds = 1
        let report = try await ResumeBenchmark(options: options).run()
        #expect(report.rows.count == 2 && report.sessionBytes == 600 * 2 * 8 * 128 * 2 * 2)
        for row in report.rows {
            #expect(row.coldMillis > 0 && row.prefetchedMillis > 0 && row.coldGetMillis <= row.coldMillis)
            #expect(row.thinkMillis == 0 || row.coldMillis >= row.thinkMillis)
        }
        // Every resume prefetched the session's 3 pages (2 whole, a tail); the GETs found them.
        #expect(report.prefetchLoaded > 0 && report.prefetchUseful > 0 && report.prefetchUseful <= report.prefetchLoaded)
    }
}
