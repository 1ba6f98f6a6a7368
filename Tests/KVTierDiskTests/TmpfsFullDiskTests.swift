@preconcurrency import Glibc
import KVTierCore
import KVTierIO
import KVTierStore
import KVTierTools
import SystemPackage
import Testing

/// A disk tier filling a real, small file system (a 4 MiB tmpfs): writes fail with ENOSPC and
/// nothing else breaks. Needs root (CAP_SYS_ADMIN) to mount; skipped with the reason otherwise.
@Suite(.serialized) struct TmpfsFullDiskTests {
    @Test func aFullFileSystemFailsWritesAndKeepsEverythingAcknowledged() async throws {
        let mount = try SmallTmpfs.mountOrCancel(sizeMiB: 4)
        defer { mount.unmount() }
        var configuration = DiskTierConfiguration()
        configuration.segmentBytes = 256 << 10
        // Retry the disk on the next write instead of failing fast for half a second.
        configuration.retryAfterFailureMicros = 0
        let choice: ReadPathChoice = ioUringUnavailableReason == nil ? .ioUring : .pread
        var (tier, reader) = try openTier(root: mount.path, choice: choice, configuration: configuration)
        defer { reader.close() }

        // 1. Fill it.
        var acknowledged: [CrashTestPage] = []
        var firstFailure: DiskTierError?
        var next: UInt64 = 0
        while firstFailure == nil, next < 400 {
            let page = CrashTestPage(number: next)
            next += 1
            do { try await tier.write(page); acknowledged.append(page) } catch { firstFailure = error }
        }
        let failure = try #require(firstFailure, "400 pages (~30 MiB raw) fit in a 4 MiB tmpfs?")
        #expect(Self.isNoSpace(failure), "a full disk should fail with ENOSPC, got \(failure)")
        #expect(acknowledged.count > 5, "only \(acknowledged.count) pages fit before the first failure")
        // More writes keep failing cleanly (some small one may still squeeze in).
        var failuresWhileFull = 1
        for _ in 0..<10 {
            let page = CrashTestPage(number: next)
            next += 1
            do {
                try await tier.write(page)
                acknowledged.append(page)
            } catch {
                failuresWhileFull += 1
                #expect(Self.isNoSpace(error), "while full: \(error)")
            }
        }
        print("TmpfsFullDiskTests: \(acknowledged.count) pages acknowledged before ENOSPC; first failure: \(failure); \(failuresWhileFull) of 11 writes failed while full; reads via \(tier.readPath)")
        #expect(tier.stats.writeFailures >= failuresWhileFull)

        // Older tmpfs refuses O_DIRECT (EINVAL); PosixStorage then reads through the page cache.
        // Either way the reads below must work; which one this kernel took is printed.
        let segmentName = try #require(try PosixStorage(root: mount.path, reader: reader, logger: diskTestLogger)
            .list(configuration.directory).first { $0.hasSuffix(".kvs") })
        let probe = try SegmentFile(forReadingAt: FilePath("\(mount.path)/\(configuration.directory)/\(segmentName)"))
        print("TmpfsFullDiskTests: segment files on this tmpfs open in \(probe.mode) mode")

        // 2. Reads keep working while full, and every acknowledged page is exact.
        for (page, check) in zip(acknowledged, await tier.check(acknowledged)) {
            #expect(check == .exact, "while full: acknowledged page \(page.number) reads as \(check)")
        }

        // 3. Deleting pages and compacting may free room (tombstones need a block each, copies
        // need room before the old segment goes); whether it does is reported, not required.
        // Today every delete fails here: the active segment is at its size limit, so each group
        // first seals it and starts a new segment, which needs room the disk does not have
        // (docs/testing.md, "Known limitations"). A failed delete must leave the page readable.
        var deleted: [CrashTestPage] = []
        var deleteFailures = 0
        var firstDeleteFailure: DiskTierError?
        for page in acknowledged.enumerated().filter({ $0.offset % 2 == 0 }).map(\.element) {
            do {
                if try await tier.delete(page.address) { deleted.append(page) }
            } catch {
                deleteFailures += 1
                if firstDeleteFailure == nil { firstDeleteFailure = error }
            }
        }
        await tier.compact()
        acknowledged.removeAll { page in deleted.contains { $0.number == page.number } }
        let afterCompaction = CrashTestPage(number: next)
        next += 1
        let roomAfterCompaction: Bool
        do {
            try await tier.write(afterCompaction)
            acknowledged.append(afterCompaction)
            roomAfterCompaction = true
        } catch {
            roomAfterCompaction = false
        }
        print("TmpfsFullDiskTests: deleted \(deleted.count) pages while full (\(deleteFailures) deletes failed, first: \(firstDeleteFailure.map { "\($0)" } ?? "none")); compactions \(tier.stats.compactions); a write after compaction \(roomAfterCompaction ? "succeeded" : "still failed")")
        for page in deleted { #expect(!tier.contains(page.address), "deleted page \(page.number) is still listed") }
        for (page, check) in zip(acknowledged, await tier.check(acknowledged)) {
            #expect(check == .exact, "after deletes and compaction: acknowledged page \(page.number) reads as \(check)")
        }

        // 4. A restart while still full opens the store (recovery and the manifest rewrite need
        // little or no room) and serves every acknowledged page.
        await tier.close()
        reader.close()
        do {
            (tier, reader) = try openTier(root: mount.path, choice: choice, configuration: configuration)
        } catch {
            Issue.record("a restart on the full file system cannot open the store (reads would be lost until space is freed): \(error)")
            try mount.remount(sizeMiB: 16)
            (tier, reader) = try openTier(root: mount.path, choice: choice, configuration: configuration)
        }
        #expect(tier.recovery.damagedRecords == 0, "restart while full: \(tier.recovery)")
        for (page, check) in zip(acknowledged, await tier.check(acknowledged)) {
            #expect(check == .exact, "restart while full: acknowledged page \(page.number) reads as \(check)")
        }

        // 5. Grow the file system: writes must succeed again.
        try mount.remount(sizeMiB: 16)
        var writtenAfterGrowth = 0
        for _ in 0..<20 {
            let page = CrashTestPage(number: next)
            next += 1
            do {
                try await tier.write(page)
                acknowledged.append(page)
                writtenAfterGrowth += 1
            } catch {
                Issue.record("after growing the file system to 16 MiB, writing page \(page.number) failed: \(error)")
            }
        }
        #expect(writtenAfterGrowth == 20)
        #expect(!tier.stats.writesSuspended)
        for (page, check) in zip(acknowledged, await tier.check(acknowledged)) {
            #expect(check == .exact, "after growing: acknowledged page \(page.number) reads as \(check)")
        }

        // 6. And all of it survives a restart.
        await tier.close()
        reader.close()
        (tier, reader) = try openTier(root: mount.path, choice: choice, configuration: configuration)
        #expect(tier.recovery.damagedRecords == 0, "\(tier.recovery)")
        for (page, check) in zip(acknowledged, await tier.check(acknowledged)) {
            #expect(check == .exact, "after restart: acknowledged page \(page.number) reads as \(check)")
        }
        for page in deleted { #expect(!tier.contains(page.address), "after restart: deleted page \(page.number) is back") }
        // Pages whose write failed may not come back wrong either (a rolled-back group is cut off).
        let listed = tier.pages().compactMap { CrashTestPage(address: $0.address) }
        #expect(listed.count == tier.pages().count, "after restart: pages the test never wrote are listed")
        for (page, check) in zip(listed, await tier.check(listed)) {
            #expect(check == .exact, "after restart: listed page \(page.number) reads as \(check)")
        }
        let unacknowledged = listed.filter { page in !acknowledged.contains { $0.number == page.number } }
        #expect(unacknowledged.isEmpty, "after restart: pages whose write failed are listed: \(unacknowledged.map(\.number))")
        await tier.close()
    }

    static func isNoSpace(_ error: DiskTierError) -> Bool {
        switch error {
        case .storage(let e), .writesSuspended(let e, _): e.code == .noSpace
        default: false
        }
    }
}

/// A tmpfs of a few MiB mounted on a fresh directory under /tmp.
struct SmallTmpfs {
    let path: String

    /// Mounts, or cancels the test with the reason (not root, no CAP_SYS_ADMIN in a container).
    static func mountOrCancel(sizeMiB: Int) throws -> SmallTmpfs {
        guard geteuid() == 0 else {
            print("TmpfsFullDiskTests skipped: mounting a tmpfs needs root")
            try Test.cancel("mounting a tmpfs needs root")
        }
        let directory = try TemporaryDirectory("kvtier-tmpfs")
        if Glibc.mount("tmpfs", directory.path, "tmpfs", 0, "size=\(sizeMiB)m,mode=0700") != 0 {
            let code = errno
            directory.remove()
            let why = "mount -t tmpfs failed with errno \(code) (\(String(cString: strerror(code)))); a container needs CAP_SYS_ADMIN"
            print("TmpfsFullDiskTests skipped: \(why)")
            try Test.cancel(Comment(rawValue: why))
        }
        return SmallTmpfs(path: directory.path)
    }

    func remount(sizeMiB: Int) throws {
        guard Glibc.mount("tmpfs", path, "tmpfs", UInt(MS_REMOUNT), "size=\(sizeMiB)m") == 0 else {
            throw TestFailure("remount \(path) to \(sizeMiB) MiB: errno \(errno)")
        }
    }

    func unmount() {
        if umount2(path, Int32(MNT_DETACH)) != 0 {
            print("TmpfsFullDiskTests: umount \(path) failed: errno \(errno)")
        }
        rmdir(path)
    }
}
