@preconcurrency import Glibc
@testable import KVTierClient
import KVTierCore
import KVTierProtocol
import Testing

/// Finding 8 (docs/security.md): after a PUT, another connection of the same tenant tries
/// every means it has to change the stored page's bytes: its writable mapping of the staging
/// memory the PUT came from, a fresh writable mapping of the page arena, write(2) on it, a
/// reopen through /proc/self/fd, mprotect of a read-only mapping. Every later GET (shared
/// memory, inline, and from disk after EVICT) must return what was put.
@Suite(.serialized, .enabled(if: DaemonProcess.binary != nil, DaemonProcess.skipReason))
struct PageArenaSealTests {
    /// Bytes the attacker overwrites at the start of each arena (the daemon places a fresh
    /// tenant's first extents there); far more than the pages put.
    static let attackedBytes = 1 << 20
    static let poison = UInt8(0x5A)

    /// The means that worked, by name (an empty list is the expected outcome).
    static func overwritePageArena(_ descriptor: Int32) -> [String] {
        var worked: [String] = []
        let poison = [UInt8](repeating: Self.poison, count: attackedBytes)
        // A fresh writable shared mapping.
        if let mapped = mmap(nil, attackedBytes, PROT_READ | PROT_WRITE, MAP_SHARED, descriptor, 0), mapped != MAP_FAILED {
            mapped.copyMemory(from: poison, byteCount: attackedBytes)
            munmap(mapped, attackedBytes)
            worked.append("mmap(PROT_WRITE, MAP_SHARED)")
        }
        // write(2) on the descriptor.
        if pwrite(descriptor, poison, attackedBytes, 0) > 0 { worked.append("pwrite") }
        // A writable reopen of the same file.
        let reopened = open("/proc/self/fd/\(descriptor)", O_RDWR)
        if reopened >= 0 {
            if pwrite(reopened, poison, attackedBytes, 0) > 0 { worked.append("open(/proc/self/fd, O_RDWR) + pwrite") }
            close(reopened)
        }
        // A read-only mapping made writable.
        if let mapped = mmap(nil, attackedBytes, PROT_READ, MAP_SHARED, descriptor, 0), mapped != MAP_FAILED {
            if mprotect(mapped, attackedBytes, PROT_READ | PROT_WRITE) == 0 {
                mapped.copyMemory(from: poison, byteCount: attackedBytes)
                worked.append("mprotect(PROT_WRITE)")
            }
            munmap(mapped, attackedBytes)
        }
        return worked
    }

    @Test func noClientCanChangeAStoredPage() async throws {
        let seed = testSeed("PageArenaSealTests.noClientCanChangeAStoredPage")
        var random = SplitMix64(seed: seed)
        // fp16 on disk, so the copy read back after EVICT is bit-exact.
        let daemon = try await DaemonProcess.start(arguments: ["--disk-codec", "fp16"])
        defer { daemon.stop() }
        let writer = try await KVTierClient.connect(socketPath: daemon.socketPath, clientName: "writer")
        #expect(writer.usesSharedMemory, "shared memory: \(writer.sharedMemoryUnavailableReason ?? "offered")")
        let model = try await writer.registerModel(DaemonTests.spec)
        let tokens = DaemonTests.randomTokens(64, &random)
        let kv = DaemonTests.randomKV(tokens: 64, &random)
        #expect(try await writer.put(model, tokens: tokens, keys: kv.keys, values: kv.values) == 64)

        // The attacker: a second connection of the tenant, holding the descriptors HELLO passes.
        let attacker = try await Transport.connect(path: daemon.socketPath, replyTimeoutSeconds: 30)
        let hello = try await attacker.exchange(.hello(Hello(capabilities: .sharedMemory, clientName: "attacker")))
        defer { Transport.closeAll(hello.descriptors) }
        let pageArena = try #require(hello.descriptors.first)
        // The staging memory (the last descriptor; the only one before the fix) is writable by
        // design: overwrite all the PUT could have used, and more.
        let staging = try #require(hello.descriptors.last)
        let stagingMap = try #require(mmap(nil, Self.attackedBytes, PROT_READ | PROT_WRITE, MAP_SHARED, staging, 0))
        #expect(stagingMap != MAP_FAILED, "the staging arena is the client's to write: errno \(errno)")
        if stagingMap != MAP_FAILED {
            memset(stagingMap, Int32(Self.poison), Self.attackedBytes)
            munmap(stagingMap, Self.attackedBytes)
        }
        let worked = Self.overwritePageArena(pageArena)
        #expect(worked.isEmpty, "the page arena took writes through: \(worked.joined(separator: ", "))")

        let shared = try await writer.get(model, tokens: tokens)
        #expect(shared.tokens == 64 && shared.keys == kv.keys && shared.values == kv.values, "GET through shared memory (seed \(seed))")
        let inline = try await KVTierClient.connect(socketPath: daemon.socketPath, mapSharedMemory: false)
        let copied = try await inline.get(model, tokens: tokens)
        #expect(copied.tokens == 64 && copied.keys == kv.keys && copied.values == kv.values, "GET inline (seed \(seed))")

        let evicted = try await writer.evict(model, tokens: tokens)
        #expect(evicted.evicted == 4, "every page moves to disk: \(evicted)")
        #expect(Self.overwritePageArena(pageArena).isEmpty)
        let fromDisk = try await inline.get(model, tokens: tokens)
        #expect(fromDisk.tokens == 64 && fromDisk.keys == kv.keys && fromDisk.values == kv.values, "GET of the disk copy (seed \(seed))")
        await inline.close()
        await writer.close()
        await attacker.close()
    }
}
