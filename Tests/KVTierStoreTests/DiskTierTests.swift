import KVTierCodec
import KVTierCore
import KVTierStore
import KVTierStoreTesting
import Testing

@Suite struct DiskTierTests {
    @Test func pagesRoundTripAndSurviveReopening() async throws {
        let storage = SimulatedStorage(seed: 1)
        let tier = try DiskTier(storage: storage, configuration: smallSegments(), logger: quietLogger)
        for n in 0..<40 { try await write(tier, TestPage(number: UInt64(n))) }
        for n in 0..<40 { #expect(await readsBack(tier, TestPage(number: UInt64(n))), "page \(n)") }
        await tier.close()

        let reopened = try DiskTier(storage: storage, configuration: smallSegments(), logger: quietLogger)
        #expect(reopened.recovery.pages == 40)
        #expect(reopened.recovery.indexBlocksLoaded > 0, "sealed segments should load from their index blocks")
        for n in 0..<40 { #expect(await readsBack(reopened, TestPage(number: UInt64(n))), "page \(n) after reopening") }
        #expect(reopened.pages().count == 40)
        #expect(reopened.page(TestPage(number: 3).address)?.shape == TestPage.shape)
    }

    @Test func lossyCodecsStoreAndDecode() async throws {
        let tier = try DiskTier(storage: SimulatedStorage(seed: 2), logger: quietLogger)
        let page = TestPage(number: 5)
        try await write(tier, page, codec: Codec(.k4v4))
        guard case .success(let got) = await tier.read(page.address) else { Issue.record("k4v4 page missing"); return }
        #expect(got.page.codec == Codec(.k4v4))
        #expect(got.data.count == TestPage.shape.rawBytes)
        #expect(got.data.copyBytes() != page.data.copyBytes(), "k4v4 is lossy")
    }

    @Test func deletionsSurviveRestarts() async throws {
        let storage = SimulatedStorage(seed: 3)
        let tier = try DiskTier(storage: storage, logger: quietLogger)
        for n in 0..<6 { try await write(tier, TestPage(number: UInt64(n))) }
        #expect(try await tier.delete(TestPage(number: 2).address))
        #expect(try await !tier.delete(TestPage(number: 99).address))
        await tier.close()
        let reopened = try DiskTier(storage: storage, logger: quietLogger)
        #expect(!reopened.contains(TestPage(number: 2).address))
        #expect(reopened.contains(TestPage(number: 3).address))
        #expect(reopened.pages().count == 5)
    }

    @Test func aNewerWriteOfAKeyReplacesTheOlder() async throws {
        let storage = SimulatedStorage(seed: 4)
        let tier = try DiskTier(storage: storage, logger: quietLogger)
        let page = TestPage(number: 1)
        try await write(tier, page, codec: Codec(.k4v4))
        try await write(tier, page)
        await tier.close()
        let reopened = try DiskTier(storage: storage, logger: quietLogger)
        #expect(reopened.page(page.address)?.codec == Codec(.fp16, .zstd(level: 1)))
        #expect(await readsBack(reopened, page))
    }

    @Test func bitRotIsAMissAndRepeatedDamageQuarantinesTheSegment() async throws {
        let storage = SimulatedStorage(seed: 5)
        var configuration = DiskTierConfiguration()
        configuration.quarantineAfterFailures = 2
        let tier = try DiskTier(storage: storage, configuration: configuration, logger: quietLogger)
        for n in 0..<4 { try await write(tier, TestPage(number: UInt64(n))) }
        let victims = [TestPage(number: 0), TestPage(number: 1)]
        for victim in victims {
            let stored = try #require(tier.page(victim.address))
            storage.corrupt("store/\(segmentFile(stored.segment))", at: stored.offset + 200, bit: 3)
        }
        for victim in victims {
            guard case .failure(.damaged) = await tier.read(victim.address) else {
                Issue.record("damaged page was served"); return
            }
        }
        #expect(tier.stats.checksumFailures == 2)
        await tier.compact()  // runs after the writer has processed the quarantine
        #expect(tier.stats.quarantinedSegments == 1)
        #expect(!tier.contains(TestPage(number: 3).address), "pages of a quarantined segment leave the index")
        #expect(storage.exists("store/quarantine/\(segmentFile(tier.stats.segments > 0 ? 1 : 1))"))
        // New writes go to a fresh segment and work.
        try await write(tier, TestPage(number: 10))
        #expect(await readsBack(tier, TestPage(number: 10)))
    }

    @Test func aFullDiskFailsWritesLosesNothingAndRecovers() async throws {
        let storage = SimulatedStorage(seed: 6)
        let tier = try DiskTier(storage: storage, configuration: smallSegments(), logger: quietLogger)
        for n in 0..<10 { try await write(tier, TestPage(number: UInt64(n))) }
        storage.faults.capacityBytes = storage.usedBytes + 6000
        var failures = 0
        for n in 10..<20 {
            do { try await write(tier, TestPage(number: UInt64(n))) } catch {
                if case DiskTierError.storage(let e) = error { #expect(e.code == .noSpace) }
                failures += 1
            }
        }
        #expect(failures > 0, "writes past capacity must fail")
        for n in 0..<10 { #expect(await readsBack(tier, TestPage(number: UInt64(n))), "acknowledged page \(n) lost after ENOSPC") }
        storage.faults.capacityBytes = .max
        try await write(tier, TestPage(number: 50))
        #expect(await readsBack(tier, TestPage(number: 50)))
        #expect(!tier.stats.writesSuspended)
        await tier.close()
        let reopened = try DiskTier(storage: storage, configuration: smallSegments(), logger: quietLogger)
        for n in [0, 9, 50] { #expect(await readsBack(reopened, TestPage(number: UInt64(n)))) }
    }

    @Test func compactionReclaimsSpaceAndKeepsLivePages() async throws {
        let storage = SimulatedStorage(seed: 7)
        let tier = try DiskTier(storage: storage, configuration: smallSegments(), logger: quietLogger)
        for n in 0..<60 { try await write(tier, TestPage(number: UInt64(n))) }
        let before = tier.stats.fileBytes
        for n in 0..<60 where n % 5 != 0 { try await tier.delete(TestPage(number: UInt64(n)).address) }
        await tier.compact()
        #expect(tier.stats.compactions > 0)
        #expect(tier.stats.fileBytes < before / 2, "files \(tier.stats.fileBytes) of \(before) bytes after compaction")
        for n in stride(from: 0, to: 60, by: 5) { #expect(await readsBack(tier, TestPage(number: UInt64(n)))) }
        await tier.close()
        let reopened = try DiskTier(storage: storage, configuration: smallSegments(), logger: quietLogger)
        #expect(reopened.pages().count == 12)
        for n in 0..<60 { #expect(reopened.contains(TestPage(number: UInt64(n)).address) == (n % 5 == 0), "page \(n)") }
    }

    @Test func theDiskBudgetEvictsTheColdestPages() async throws {
        var configuration = smallSegments()
        configuration.budgetBytes = 160 << 10
        let tier = try DiskTier(storage: SimulatedStorage(seed: 8), configuration: configuration, logger: quietLogger)
        for n in 0..<80 {
            try await write(tier, TestPage(number: UInt64(n)))
            if n >= 1 { _ = await tier.read(TestPage(number: 0).address) }  // keep page 0 hot
        }
        await tier.compact()
        let stats = tier.stats
        #expect(stats.evictions > 0)
        #expect(stats.fileBytes <= 160 << 10 + 64 << 10, "files hold \(stats.fileBytes) bytes for a 160 KiB budget")
        #expect(tier.contains(TestPage(number: 0).address), "the hottest page was evicted")
        #expect(tier.contains(TestPage(number: 79).address), "the newest page was evicted")
        #expect(!tier.contains(TestPage(number: 1).address), "the coldest page survived")
    }

    @Test func aDamagedManifestIsRebuiltFromTheSegments() async throws {
        let storage = SimulatedStorage(seed: 9)
        let tier = try DiskTier(storage: storage, configuration: smallSegments(), logger: quietLogger)
        for n in 0..<30 { try await write(tier, TestPage(number: UInt64(n))) }
        await tier.close()
        storage.corrupt("store/MANIFEST", at: 20)
        let reopened = try DiskTier(storage: storage, configuration: smallSegments(), logger: quietLogger)
        #expect(reopened.recovery.manifestRebuilt)
        for n in 0..<30 { #expect(await readsBack(reopened, TestPage(number: UInt64(n)))) }
        await reopened.close()
        let again = try DiskTier(storage: storage, configuration: smallSegments(), logger: quietLogger)
        #expect(!again.recovery.manifestRebuilt)
        #expect(again.pages().count == 30)
    }

    private func segmentFile(_ id: UInt64) -> String { SegmentHeader.fileName(id) }
}
