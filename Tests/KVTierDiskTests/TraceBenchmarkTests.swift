#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import KVTierStore
import KVTierTools
import Logging
import Testing

/// `kvtier bench trace`'s engine: trace replay against a real TieredStore (shared-memory RAM
/// tier over a PosixStorage disk tier), per eviction policy.
@Suite struct TraceBenchmarkTests {
    static let tracePath = "../shared/fixtures/traces/mooncake_conversation_trace.jsonl"
    static var traceExists: Bool { FileManager.default.fileExists(atPath: tracePath) }

    static func options(ramPages: Int) -> TraceReplay.Options {
        var options = TraceReplay.Options()  // 1 layer × 1 KV head × 32: 64 KiB pages of 512 tokens
        options.ramBudgetBytes = ramPages * TraceReplay(options: options).pageBytes
        return options
    }

    static func checkAccounting(_ r: TraceReplay.Result, _ requests: [TraceRequest]) {
        let input = requests.reduce(0) { $0 + min($1.inputLength, $1.hashIDs.count * 512) }
        #expect(r.requests == requests.count)
        #expect(r.inputTokens == input)
        #expect(r.ramHitTokens + r.diskHitTokens + r.missTokens == r.inputTokens, "\(r)")
        #expect(abs(r.ramHitRate + r.diskHitRate + r.missRate - 1) < 1e-9)
        #expect((r.diskHitTokens > 0) == (r.diskBytesRead > 0), "disk hits read bytes and only they do")
    }

    @Test func tokensFollowHashIDsAndTheLastBlockIsPartial() {
        let request = TraceRequest(timestamp: 0, inputLength: 1030, outputLength: 1, hashIDs: [7, 9, 3])
        let tokens = request.tokens(blockTokens: 512)
        #expect(tokens.count == 1030)
        #expect(tokens[0] == 7 * 512 && tokens[511] == 7 * 512 + 511 && tokens[512] == 9 * 512 && tokens[1029] == 3 * 512 + 5)
    }

    /// A hand-made trace: exact figures, no fixture needed.
    @Test(arguments: [TieredStore.EvictionPolicy.heat, .lru])
    func sharedPrefixesHitAndAccountingAddsUp(policy: TieredStore.EvictionPolicy) async throws {
        let requests = [
            TraceRequest(timestamp: 0, inputLength: 1200, outputLength: 1, hashIDs: [0, 1, 2]),
            TraceRequest(timestamp: 1, inputLength: 1100, outputLength: 1, hashIDs: [0, 1, 3]),  // 1024 shared
            TraceRequest(timestamp: 2, inputLength: 1200, outputLength: 1, hashIDs: [0, 1, 2]),  // all cached
            TraceRequest(timestamp: 3, inputLength: 600, outputLength: 1, hashIDs: [5, 6]),
        ]
        let replay = TraceReplay(options: Self.options(ramPages: 64))
        let r = try await replay.withStore(policy, requests: requests, logger: Self.logger) {
            try await replay.replay(requests, on: $0, disk: $1, policy: policy.rawValue)
        }
        Self.checkAccounting(r, requests)
        #expect(r.inputTokens == 4100)
        #expect(r.ramHitTokens == 1024 + 1200 && r.diskHitTokens == 0 && r.missTokens == 4100 - 2224, "\(r)")
        #expect(r.pagesStored == 3 + 1 + 2 && r.evictions == 0)
    }

    @Test(.enabled(if: traceExists, "the Mooncake trace fixture (../shared/fixtures/traces) is absent: skipped"),
          arguments: [TieredStore.EvictionPolicy.heat, .lru])
    func mooncakePrefixReplaysConsistentlyAndASecondPassHitsMore(policy: TieredStore.EvictionPolicy) async throws {
        let requests = try TraceFile.load(Self.tracePath, limit: 200)
        #expect(requests.count == 200)
        let unique = TraceReplay.uniquePages(requests)
        let replay = TraceReplay(options: Self.options(ramPages: max(8, unique / 10)))
        let (first, second) = try await replay.withStore(policy, requests: requests, logger: Self.logger) { store, disk in
            let first = try await replay.replay(requests, on: store, disk: disk, policy: policy.rawValue)
            let second = try await replay.replay(requests, on: store, disk: disk, policy: policy.rawValue)
            return (first, second)
        }
        Self.checkAccounting(first, requests)
        Self.checkAccounting(second, requests)
        #expect(first.evictions > 0, "RAM at 10% of the unique pages must evict")
        #expect(first.diskHitTokens > 0, "evicted pages come back from disk")
        #expect(second.missRate < first.missRate, "every page of the first pass is cached (disk unlimited): \(first.missRate) → \(second.missRate)")
        #expect(second.ramHitTokens + second.diskHitTokens > first.ramHitTokens + first.diskHitTokens)
        #expect(first.pagesStored >= unique, "a page per unique hash id at least (equal ids share pages; completed partial pages count again)")
    }

    static var logger: Logger {
        var logger = Logger(label: "trace-test")
        logger.logLevel = .critical
        return logger
    }
}
