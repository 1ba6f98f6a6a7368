@preconcurrency import Glibc
import Logging
import SystemPackage
import Testing
@testable import KVTierIO

/// `BlockReaders.make`; serialized because one test sets the process environment.
@Suite("Choosing a reader", .serialized, .timeLimit(.minutes(1)))
struct BlockReadersTests {
    @Test("KVTIER_IO_URING=off forces the pread fallback and logs the reason once")
    func forcedFallback() async throws {
        setenv(BlockReaders.environmentVariable, "off", 1)
        defer { unsetenv(BlockReaders.environmentVariable) }
        let capture = LogCapture()
        let selection = try BlockReaders.make(queueDepth: 16, preadThreads: 3, logger: capture.logger)
        defer { selection.reader.close() }
        #expect(selection.reader.path == .preadPool(threads: 3))
        #expect(selection.fallbackReason == .disabledByEnvironment)
        let entries = capture.entries.withLock { $0 }
        #expect(entries.count == 1)
        #expect(entries.first?.level == .warning)
        #expect(entries.first?.message == "io_uring unavailable; reading with the pread thread pool")
        #expect(entries.first?.metadata["reason"]?.description == URingUnavailableReason.disabledByEnvironment.description)

        var generator = SeededGenerator.forTest("forcedFallback")
        let directory = try TestDirectory("forced")
        let contents = randomBytes(100_000, using: &generator)
        let descriptor = try FileDescriptor.open(try directory.file("data", bytes: contents), .readOnly)
        defer { _ = try? descriptor.close() }
        let (plan, bufferSize) = planReads(count: 30, fileSize: contents.count, maxLength: 20_000, using: &generator)
        try await readAndVerify(plan, bufferSize: bufferSize, from: descriptor, contents: contents, using: selection.reader)
    }

    @Test("the setting is case-insensitive and other values do not force the fallback")
    func settingValues() throws {
        let logger = Logger(label: "kvtier.io.test")
        let upper = try BlockReaders.make(queueDepth: 8, preadThreads: 1, logger: logger, setting: "OFF")
        defer { upper.reader.close() }
        #expect(upper.fallbackReason == .disabledByEnvironment)
        let other = try BlockReaders.make(queueDepth: 8, preadThreads: 1, logger: logger, setting: "on")
        defer { other.reader.close() }
        #expect(other.fallbackReason != .disabledByEnvironment)
    }

    @Test("probe: io_uring is used where the kernel allows it")
    func probe() async throws {
        let capture = LogCapture()
        let selection = try BlockReaders.make(queueDepth: 16, preadThreads: 2, logger: capture.logger, setting: nil)
        defer { selection.reader.close() }
        let disabledSysctl = readFirstLine("/proc/sys/kernel/io_uring_disabled")
        if let reason = selection.fallbackReason {
            #expect(selection.reader.path == .preadPool(threads: 2))
            #expect(capture.entries.withLock { $0.count } == 1)
            print("skipping io_uring probe: \(reason) (kernel.io_uring_disabled=\(disabledSysctl ?? "absent"))")
            try Test.cancel("io_uring unavailable: \(reason)")
        }
        // Available: the sysctl must not forbid it, nothing is logged, and the ring reads.
        #expect(disabledSysctl != "2")
        #expect(selection.reader.path == .ioUring(queueDepth: 16))
        #expect(capture.entries.withLock { $0.isEmpty })
        var generator = SeededGenerator.forTest("probe")
        let directory = try TestDirectory("probe")
        let contents = randomBytes(50_000, using: &generator)
        let descriptor = try FileDescriptor.open(try directory.file("data", bytes: contents), .readOnly)
        defer { _ = try? descriptor.close() }
        let (plan, bufferSize) = planReads(count: 40, fileSize: contents.count, maxLength: 10_000, using: &generator)
        try await readAndVerify(plan, bufferSize: bufferSize, from: descriptor, contents: contents, using: selection.reader)
    }

    @Test("reasons say how to fix them")
    func reasonDescriptions() {
        #expect(URingUnavailableReason.setupFailed(.notPermitted).description.contains("io_uring_disabled"))
        #expect(URingUnavailableReason.setupFailed(.noFunction).description.contains("ENOSYS"))
        #expect(URingUnavailableReason.setupFailed(.noMemory).description.contains("MEMLOCK"))
        #expect(URingUnavailableReason.disabledByEnvironment.description.contains("KVTIER_IO_URING"))
    }
}

func readFirstLine(_ path: String) -> String? {
    guard let file = fopen(path, "r") else { return nil }
    defer { fclose(file) }
    var line = [CChar](repeating: 0, count: 64)
    guard fgets(&line, 64, file) != nil else { return nil }
    return String(decoding: line.prefix(while: { $0 != 0 && $0 != 10 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
