@preconcurrency import Glibc
import KVTierCore
import KVTierSystem
import SystemPackage
import Testing

private typealias Extent = SharedArena.Extent
private let mebibyte = 1 << 20

/// Fills `extent` of `arena` with bytes from `generator`; returns them.
private func fill(_ arena: borrowing SharedArena, _ extent: Extent, using generator: inout SeededGenerator) -> [UInt8] {
    let bytes = randomBytes(extent.length, using: &generator)
    arena.withBytes(extent) { raw in raw.copyBytes(from: bytes) }
    return bytes
}

private func contents(_ arena: borrowing SharedArena, _ extent: Extent) -> [UInt8] {
    arena.withBytes(extent) { Array($0) }
}

@Suite struct SharedArenaTests {
    @Test func ownerAndClientMappingsShareBytes() throws {
        var random = SeededGenerator.forTest("ownerAndClientMappingsShareBytes")
        let owner = try SharedArena(name: "kvtier-arena-test", capacity: mebibyte)
        let extent = Extent(offset: 64 << 10, length: 12 << 10)
        let written = fill(owner, extent, using: &random)

        let client = try SharedArena.map(descriptor: owner.descriptor, capacity: mebibyte)
        #expect(client.descriptor != owner.descriptor, "the client keeps its own duplicate")
        #expect(contents(client, extent) == written)

        // From a dup, as a descriptor that arrived through SCM_RIGHTS would be.
        let duplicate = fcntl(owner.descriptor, F_DUPFD_CLOEXEC, 0)
        try #require(duplicate >= 0)
        let second = try SharedArena.map(descriptor: duplicate, capacity: mebibyte)
        #expect(Glibc.close(duplicate) == 0, "map leaves the caller's descriptor to the caller")
        #expect(contents(second, extent) == written)

        // Writes flow the other way too, and a smaller mapping sees a prefix.
        let back = Extent(offset: 0, length: 4096)
        let fromClient = fill(second, back, using: &random)
        #expect(contents(owner, back) == fromClient)
        let prefix = try SharedArena.map(descriptor: owner.descriptor, capacity: 128 << 10)
        #expect(contents(prefix, extent) == written)
        try second.close()
        try client.close()
        #expect(contents(owner, extent) == written, "closing a client mapping keeps the memory")
    }

    @Test func releaseReturnsMemoryAndReadsAsZero() throws {
        var random = SeededGenerator.forTest("releaseReturnsMemoryAndReadsAsZero")
        let arena = try SharedArena(name: "kvtier-arena-release", capacity: 8 * mebibyte)
        let client = try SharedArena.map(descriptor: arena.descriptor, capacity: 8 * mebibyte)
        let initial = try arena.residentBytes()
        #expect(initial == 0, "a new arena commits nothing")

        // 2 MiB-aligned, so the figures hold with transparent huge pages for shmem as well.
        let touched = Extent(offset: 0, length: 6 * mebibyte)
        let written = fill(client, touched, using: &random)
        let before = try arena.residentBytes()
        print("releaseReturnsMemoryAndReadsAsZero: resident \(before) after writing \(touched.length)")
        #expect(before >= touched.length && before <= touched.length + 2 * mebibyte)

        let released = Extent(offset: 2 * mebibyte, length: 2 * mebibyte)
        try arena.release(released)
        let after = try arena.residentBytes()
        #expect(after == before - released.length, "resident \(before) → \(after)")

        #expect(contents(client, released).allSatisfy { $0 == 0 }, "released bytes read as zero in every mapping")
        #expect(contents(arena, Extent(offset: 0, length: 2 * mebibyte)) == Array(written[..<(2 * mebibyte)]))
        #expect(contents(arena, Extent(offset: 4 * mebibyte, length: 2 * mebibyte)) == Array(written[(4 * mebibyte)...]))
        // Reading a hole through a shared mapping allocates zeroed pages: worth knowing, not a contract.
        print("releaseReturnsMemoryAndReadsAsZero: resident \(try arena.residentBytes()) after reading the hole")

        try arena.release(touched)
        let final = try arena.residentBytes()
        #expect(final == 0)
        try arena.release(Extent(offset: 0, length: 0))  // Empty: nothing to do.
    }

    @Test func capacityBeyondMemoryIsSparse() throws {
        let capacity = 64 << 30  // More than this machine's RAM; nothing is committed until touched.
        let arena = try SharedArena(name: "kvtier-arena-sparse", capacity: capacity)
        #expect(arena.capacity == capacity)
        let initial = try arena.residentBytes()
        #expect(initial == 0)
        let last = Extent(offset: capacity - 4096, length: 4096)
        let first = Extent(offset: 0, length: 4096)
        for extent in [first, last] { _ = arena.withBytes(extent) { $0.initializeMemory(as: UInt8.self, repeating: 0xA5) } }
        let resident = try arena.residentBytes()
        #expect(resident >= 8192 && resident <= 4 * mebibyte, "resident \(resident) for two touched pages")
        let client = try SharedArena.map(descriptor: arena.descriptor, capacity: capacity)
        #expect(contents(client, last) == Array(repeating: 0xA5, count: 4096))
        try arena.release(first)
        try arena.release(last)
        let final = try arena.residentBytes()
        #expect(final == 0)
    }

    @Test func mapRefusesCapacitiesTheFileCannotBack() throws {
        let arena = try SharedArena(name: "kvtier-arena-sizes", capacity: mebibyte)
        for capacity in [mebibyte + 4096, 2 * mebibyte, 0, -4096, 4095, mebibyte - 1] {
            #expect(throws: Errno.invalidArgument, "capacity \(capacity)") {
                _ = try SharedArena.map(descriptor: arena.descriptor, capacity: capacity)
            }
        }
        #expect(throws: Errno.badFileDescriptor) { _ = try SharedArena.map(descriptor: -1, capacity: 4096) }
    }

    @Test func mapRefusesAFileThatCouldShrink() throws {
        let directory = try TestDirectory("shared-arena")
        let path = try directory.file("plain", bytes: Array(repeating: 7, count: 8192))
        let descriptor = try FileDescriptor.open(path, .readWrite)
        defer { _ = try? descriptor.close() }
        #expect(throws: Errno.notPermitted, "a plain file has no seals, so a peer could truncate it") {
            _ = try SharedArena.map(descriptor: descriptor.rawValue, capacity: 8192)
        }
    }

    @Test func sealsStopAPeerFromResizing() throws {
        let arena = try SharedArena(name: "kvtier-arena-seals", capacity: mebibyte)
        for size in [0, mebibyte - 4096, 2 * mebibyte] {
            #expect(ftruncate(arena.descriptor, off_t(size)) == -1 && errno == EPERM, "ftruncate to \(size)")
        }
        let sealWrite: Int32 = 0x8  // F_SEAL_WRITE: would break the daemon's `release`.
        #expect(fcntl(arena.descriptor, 1024 + 9, sealWrite) == -1 && errno == EPERM, "seals are sealed")
        var status = stat()
        #expect(fstat(arena.descriptor, &status) == 0 && Int(status.st_size) == mebibyte)
    }

    @Test func creationFailuresAreTyped() throws {
        // The kernel limits memfd names to 249 bytes (NAME_MAX minus "memfd:") and answers EINVAL.
        _ = try SharedArena(name: String(repeating: "n", count: 249), capacity: 4096)
        #expect(throws: Errno.invalidArgument) {
            _ = try SharedArena(name: String(repeating: "n", count: 250), capacity: 4096)
        }
        #expect(throws: Errno.invalidArgument) { _ = try SharedArena(name: "kvtier\0arena", capacity: 4096) }
        for capacity in [0, -4096, 4097] {
            #expect(throws: Errno.invalidArgument, "capacity \(capacity)") {
                _ = try SharedArena(name: "kvtier-arena-test", capacity: capacity)
            }
        }
        // Beyond the largest file size (MAX_LFS_FILESIZE): ftruncate's error, and nothing leaks.
        #expect(throws: Errno.self) { _ = try SharedArena(name: "kvtier-arena-huge", capacity: Int.max / 4096 * 4096) }
    }

    @Test func nameShowsInProc() throws {
        let arena = try SharedArena(name: "kvtier-arena-42", capacity: 4096)
        var target = [CChar](repeating: 0, count: 256)
        let count = readlink("/proc/self/fd/\(arena.descriptor)", &target, target.count - 1)
        try #require(count > 0)
        let link = String(decoding: target.prefix(count).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        #expect(link == "/memfd:kvtier-arena-42 (deleted)")
    }

    @Test func containsChecksBoundsAndAlignment() throws {
        let arena = try SharedArena(name: "kvtier-arena-bounds", capacity: 16 * 4096)
        for inside in [
            Extent(offset: 0, length: 16 * 4096), Extent(offset: 15 * 4096, length: 4096),
            Extent(offset: 16 * 4096, length: 0),
        ] {
            let contained = arena.contains(inside)
            #expect(contained, "\(inside)")
        }
        for outside in [
            Extent(offset: 15 * 4096, length: 2 * 4096), Extent(offset: 16 * 4096, length: 4096),
            Extent(offset: -4096, length: 4096), Extent(offset: 0, length: -4096),
            Extent(offset: 4096, length: Int.max - 4095), Extent(offset: 1, length: 4096),
            Extent(offset: 0, length: 100),
        ] {
            let contained = arena.contains(outside)
            #expect(!contained, "\(outside)")
        }
    }

    @Test func aPageArenaIsReadOnlyToClients() throws {
        var random = SeededGenerator.forTest("aPageArenaIsReadOnlyToClients")
        let owner = try SharedArena(name: "kvtier-arena-pages", capacity: mebibyte, sharing: .clientsRead)
        let sealed = owner.seals
        #expect(sealed & 0x10 != 0 && sealed & 0x2 != 0 && sealed & 0x1 != 0, "future-write, shrink and seal seals (\(sealed))")
        let extent = Extent(offset: 8192, length: 8192)
        let written = fill(owner, extent, using: &random)
        let client = try SharedArena.map(descriptor: owner.descriptor, capacity: mebibyte, sharing: .clientsRead)
        #expect(contents(client, extent) == written, "the owner's mapping, made before the seal, still writes")
        #expect(throws: Errno.notPermitted, "no new writable mapping of a write-sealed memfd") {
            _ = try SharedArena.map(descriptor: owner.descriptor, capacity: mebibyte, sharing: .clientsWrite)
        }
        #expect(throws: Errno.notPermitted, "nor a write(2)") {
            _ = try [UInt8(1)].withUnsafeBytes { raw in try FileDescriptor(rawValue: owner.descriptor).writeSome(raw) }
        }
        #expect(throws: Errno.notPermitted, "a page arena cannot give memory back") { try owner.release(extent) }

        let staging = try SharedArena(name: "kvtier-arena-staging", capacity: mebibyte)
        #expect(throws: Errno.notPermitted, "a client insists on the write seal before trusting bytes as read-only") {
            _ = try SharedArena.map(descriptor: staging.descriptor, capacity: mebibyte, sharing: .clientsRead)
        }
    }

    @Test func writingThroughAReadOnlyMappingFaults() async {
        await #expect(processExitsWith: .signal(SIGSEGV)) {
            let owner = try! SharedArena(name: "kvtier-arena-fault", capacity: 4096, sharing: .clientsRead)
            let client = try! SharedArena.map(descriptor: owner.descriptor, capacity: 4096, sharing: .clientsRead)
            client.withBytes(Extent(offset: 0, length: 4096)) { $0[0] = 1 }
        }
    }

    @Test func withBytesOutsideTheArenaTraps() async {
        await #expect(processExitsWith: .failure) {
            let arena = try! SharedArena(name: "kvtier-arena-trap", capacity: 4096)
            arena.withBytes(SharedArena.Extent(offset: 4096, length: 4096)) { $0[0] = 1 }
        }
    }
}
