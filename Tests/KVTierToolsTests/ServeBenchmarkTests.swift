@preconcurrency import Glibc
import KVTierTools
import Testing

/// `kvtier bench serve` end to end on the debug builds of kvtierd and kvtier (the workers are
/// `kvtier bench serve-worker` processes): skipped when they are not built.
@Suite struct ServeBenchmarkTests {
    static let buildFolder: String = {
        var path = #filePath
        for _ in 0..<3 { path = String(path[..<path.lastIndex(of: "/")!]) }
        return path + "/.build/debug"
    }()
    static let daemon = buildFolder + "/kvtierd"
    static let kvtier = buildFolder + "/kvtier"
    static let built = access(daemon, X_OK) == 0 && access(kvtier, X_OK) == 0

    @Test(.enabled(if: built, "kvtierd and kvtier are not built in .build/debug (swift build)"))
    func oneClientOneSecondWithoutRedis() async throws {
        let benchmark = ServeBenchmark(clients: 1, pageBytes: 256 << 10, seconds: 1, compareRedis: false, daemonPath: Self.daemon,
                                       workerCommand: [Self.kvtier, "bench", "serve-worker"], maxWorkingSetBytes: 64 << 20)
        let r = try await benchmark.run()
        #expect(r.clients == 1 && r.pageBytes == 256 << 10)
        #expect(r.putOps > 0 && r.getOps > 0)
        #expect(r.putOps <= 256, "the put phase stops at the working-set cap (64 MiB of 256 KiB pages)")
        #expect(r.putGBps > 0 && r.getGBps > 0 && r.memcpyGBps > 0)
        #expect(r.getP50Micros > 0 && r.getP50Micros <= r.getP99Micros)
        #expect(r.putP50Micros > 0 && r.putP50Micros <= r.putP99Micros)
        #expect(r.getVsMemcpy > 0)
        #expect(r.memcpyPerGetGBps > 0 && r.memcpyPerGetMicros > 0 && r.getVsMemcpyPerGet > 0)
        // One 256 KiB copy at the per-GET memcpy's rate takes the time it reports.
        #expect(abs(r.memcpyPerGetMicros - Double(256 << 10) / r.memcpyPerGetGBps / 1e3) < 1e-6)
        #expect(r.redisGetGBps == nil && r.getVsRedis == nil)
    }

    @Test func pageSizesMustBeWholeTokens() async throws {
        #expect(ServeWorker.model(pageBytes: 256 << 10)?.pageTokens == 64)
        #expect(ServeWorker.model(pageBytes: 4096)?.pageTokens == 1)
        #expect(ServeWorker.model(pageBytes: 5000) == nil)
        let benchmark = ServeBenchmark(clients: 1, pageBytes: 5000, seconds: 1, daemonPath: Self.daemon, workerCommand: [Self.kvtier])
        await #expect(throws: ToolError.self) { try await benchmark.run() }
    }
}
