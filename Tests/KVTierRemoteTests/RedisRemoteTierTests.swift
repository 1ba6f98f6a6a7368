@preconcurrency import Glibc
import KVTierCore
import KVTierRemote
import KVTierStore
import KVTierSystem
import KVTierTestProcess
import Testing

/// RedisRemoteTier against real redis-server processes.
@Suite(.disabled(if: redisMissing, "neither redis-server nor valkey-server is on PATH (scripts/install-deps installs redis-server)"))
struct RedisRemoteTierTests {
    let key = DigestKey.random()

    @Test func writtenBehindThenFetchedUnderTenantKeysWithTheTTL() async throws {
        let server = try await startRedis()
        let tier = try makeTier(server, key: key) { $0.ttlSeconds = 3_600 }
        defer { tier.shutdown(drainMillis: 0) }
        let pages = try (0..<5).map { n in try pageRecord(address(alice, UInt64(n)), seed: UInt64(n)) }
        tier.offer((0..<5).map { RemotePageWrite(address: address(alice, UInt64($0)), record: pages[$0].record) })
        #expect(await tier.drainedOffPool(timeoutMillis: 10_000))
        #expect(counter(tier.status(), "remote_writes") == 5)
        #expect(counter(tier.status(), "remote_pages") == 5)

        // Keys name the tenant: bob's address of the same page key is another key, and absent.
        let connection = try inspect(server)
        let name = "kvtier:t\(alice.rawValue):\(address(alice, 3).key)"
        #expect(try connection.command(["EXISTS", name]) == .integer(1))
        guard case .integer(let ttl) = try connection.command(["PTTL", name]) else { throw TestFailure("PTTL") }
        #expect(ttl > 3_500_000 && ttl <= 3_600_000)
        #expect(await tier.containsOffPool([address(alice, 0), address(bob, 0), address(alice, 9), address(alice, 4)]) == [true, false, false, true])

        let values = await tier.fetchOffPool([address(alice, 1), address(alice, 7), address(alice, 2)], maxValueBytes: RemoteRecord.maxValueBytes(testModel))
        #expect(values.map { $0 != nil } == [true, false, true])
        for (value, n) in zip([values[0], values[2]], [1, 2]) {
            let value = try #require(value)
            let output = PageBuffer(byteCount: testModel.pageShape(tokens: testModel.pageTokens).rawBytes)
            let tokens = try RemoteRecord.open(value.bytes, key: key, address: address(alice, UInt64(n)), model: testModel, into: output.bytes)
            #expect(tokens == testModel.pageTokens)
            #expect(output.copyBytes() == pages[n].data)
            value.recycle()
        }
    }

    @Test func theBudgetDeletesTheOldestPagesThisDaemonWrote() async throws {
        let server = try await startRedis()
        let first = try pageRecord(address(alice, 0), seed: 0)
        let valueBytes = try #require(first.record.withUnsafeBytes { RemoteRecord.seal($0, key: key) }).count
        let tier = try makeTier(server, key: key) { $0.budgetBytes = 3 * valueBytes }
        defer { tier.shutdown(drainMillis: 0) }
        for n in 0..<5 {
            tier.offer([RemotePageWrite(address: address(alice, UInt64(n)), record: try pageRecord(address(alice, UInt64(n)), seed: UInt64(n)).record)])
            #expect(await tier.drainedOffPool(timeoutMillis: 10_000))
        }
        #expect(await tier.containsOffPool((0..<5).map { address(alice, UInt64($0)) }) == [false, false, true, true, true])
        #expect(counter(tier.status(), "remote_deletes") == 2)
        #expect(counter(tier.status(), "remote_bytes") == UInt64(3 * valueBytes))
        #expect(counter(tier.status(), "remote_budget_bytes") == UInt64(3 * valueBytes))
    }

    @Test func aValueOverTheLimitIsAMissNotAnAllocation() async throws {
        let server = try await startRedis()
        let tier = try makeTier(server, key: key)
        defer { tier.shutdown(drainMillis: 0) }
        let connection = try inspect(server)
        let huge = [UInt8](repeating: 7, count: 3 << 20)
        try huge.withUnsafeBytes { raw in try connection.set(key: Array("kvtier:t1000:\(address(alice, 1).key)".utf8), value: raw) }
        let values = await tier.fetchOffPool([address(alice, 1)], maxValueBytes: 1 << 20)
        #expect(values.count == 1 && values[0] == nil)
        #expect(counter(tier.status(), "remote_oversized") == 1)
        #expect(counter(tier.status(), "remote_up") == 1, "the server answered: the tier stays up")
    }

    @Test func aKilledServerCostsFastMissesThenComesBack() async throws {
        let server = try await startRedis()
        // A back-off longer than anything below takes, so the calls while down are all skipped.
        let tier = try makeTier(server, key: key) {
            $0.timeoutMillis = 200
            $0.minRetryMillis = 3_000
        }
        defer { tier.shutdown(drainMillis: 0) }
        let page = try pageRecord(address(alice, 1), seed: 1)
        tier.offer([RemotePageWrite(address: address(alice, 1), record: page.record)])
        #expect(await tier.drainedOffPool(timeoutMillis: 10_000))
        #expect(await tier.containsOffPool([address(alice, 1)]) == [true])

        server.kill()
        let (first, answer) = await timedOffPool { tier.contains([address(alice, 1)]) }
        #expect(answer == [false])
        #expect(first < 1_000, "a dead server's first miss took \(first) ms")
        #expect(counter(tier.status(), "remote_up") == 0)
        // Down: misses without a system call, and writes dropped rather than queued for long.
        let skippedBefore = counter(tier.status(), "remote_skipped") ?? 0
        let (second, answers) = await timedOffPool {
            tier.contains([address(alice, 1)]) + tier.fetch([address(alice, 1)], maxValueBytes: 1 << 20).map { $0 != nil }
        }
        #expect(answers == [false, false])
        // No connect, no wait: well under the 200 ms timeout (generous for a loaded machine);
        // `remote_skipped` says no request was tried.
        #expect(second < 100, "misses while down took \(second) ms")
        #expect((counter(tier.status(), "remote_skipped") ?? 0) >= skippedBefore + 2)
        tier.offer([RemotePageWrite(address: address(alice, 2), record: page.record)])
        #expect(await tier.drainedOffPool(timeoutMillis: 10_000))
        #expect((counter(tier.status(), "remote_writes_dropped") ?? 0) >= 1)

        // Back (empty: no persistence): after the back-off one caller reconnects.
        try await server.restart()
        let deadline = Deadline(millisFromNow: 30_000)
        while counter(tier.status(), "remote_up") == 0, !deadline.passed {
            _ = await tier.containsOffPool([address(alice, 1)])
            try await Task.sleep(for: .milliseconds(100))
        }
        #expect(counter(tier.status(), "remote_up") == 1)
        #expect((counter(tier.status(), "remote_reconnects") ?? 0) >= 1)
        tier.offer([RemotePageWrite(address: address(alice, 1), record: page.record)])
        #expect(await tier.drainedOffPool(timeoutMillis: 10_000))
        #expect(await tier.containsOffPool([address(alice, 1)]) == [true])
    }

    @Test func aHungServerCostsTheTimeoutNotAHang() async throws {
        let server = try await startRedis()
        let tier = try makeTier(server, key: key) { $0.timeoutMillis = 150 }
        defer { tier.shutdown(drainMillis: 0) }
        #expect(await tier.containsOffPool([address(alice, 1)]) == [false])  // connected, up
        server.freeze()
        defer { server.thaw() }
        let (waited, answer) = await timedOffPool { tier.fetch([address(alice, 1)], maxValueBytes: 1 << 20).map { $0 != nil } }
        #expect(answer == [false])
        #expect(waited >= 100 && waited < 2_000, "a hung server held the fetch for \(waited) ms (timeout 150)")
        #expect(counter(tier.status(), "remote_up") == 0)
        #expect(counter(tier.status(), "remote_failures") == 1)
    }

    @Test func aFullServerRefusesWritesAndStaysUp() async throws {
        let server = try await startRedis(extraArguments: ["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"])
        let tier = try makeTier(server, key: key)
        defer { tier.shutdown(drainMillis: 0) }
        let pages = try (0..<400).map { n in RemotePageWrite(address: address(alice, UInt64(n)), record: try pageRecord(address(alice, UInt64(n)), seed: UInt64(n)).record) }
        tier.offer(pages)
        #expect(await tier.drainedOffPool(timeoutMillis: 30_000))
        let status = tier.status()
        #expect((counter(status, "remote_write_errors") ?? 0) > 0, "OOM replies counted")
        #expect((counter(status, "remote_writes") ?? 0) > 0)
        #expect(counter(status, "remote_up") == 1)
        #expect(await tier.containsOffPool([address(alice, 0)]) == [true])
    }

    @Test func passwordsAndTCP() async throws {
        let port = UInt16(20_000 + Int(getpid() % 20_000))
        let server = try await startRedis(tcpPort: port, extraArguments: ["--requirepass", "s3cret"])
        var configuration = RedisRemoteTier.Configuration(url: RedisURL(endpoint: .tcp(host: "127.0.0.1", port: port)), password: "s3cret", key: key)
        configuration.timeoutMillis = 1_000
        let tier = try RedisRemoteTier(configuration: configuration, logger: quietLogger)
        defer { tier.shutdown(drainMillis: 0) }
        tier.offer([RemotePageWrite(address: address(alice, 1), record: try pageRecord(address(alice, 1), seed: 1).record)])
        #expect(await tier.drainedOffPool(timeoutMillis: 10_000))
        #expect(await tier.containsOffPool([address(alice, 1)]) == [true])

        configuration.password = "wrong"
        let refused = try RedisRemoteTier(configuration: configuration, logger: quietLogger)
        defer { refused.shutdown(drainMillis: 0) }
        #expect(await refused.containsOffPool([address(alice, 1)]) == [false])
        #expect(refused.lastError.contains("WRONGPASS") || refused.lastError.contains("invalid"), "\(refused.lastError)")
    }

    @Test func theQueueIsBoundedAndDropsWhatDoesNotFit() async throws {
        let server = try await startRedis()
        server.freeze()  // the writer's first batch waits; the rest queue up
        let page = try pageRecord(address(alice, 0), seed: 0)
        let tier = try makeTier(server, key: key) {
            $0.queueBytes = 4 * page.record.count
            $0.timeoutMillis = 150
        }
        defer { tier.shutdown(drainMillis: 0) }
        tier.offer((0..<20).map { RemotePageWrite(address: address(alice, UInt64($0)), record: page.record) })
        let status = tier.status()
        #expect((counter(status, "remote_writes_dropped") ?? 0) >= 16)
        #expect((counter(status, "remote_queue_bytes") ?? 0) <= UInt64(4 * page.record.count))
        server.thaw()
        #expect(await tier.drainedOffPool(timeoutMillis: 10_000))
    }
}
