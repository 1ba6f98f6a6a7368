@preconcurrency import Glibc
import Synchronization
import SystemPackage
import Testing
@testable import KVTierIO

/// Behaviour both readers share, run on each.
@Suite("Block readers", .timeLimit(.minutes(2)))
struct BlockReaderTests {
    @Test("random reads of many sizes and offsets, batches larger than the queue depth", arguments: ReaderKind.allCases)
    func randomReads(kind: ReaderKind) async throws {
        let reader = try kind.make(queueDepth: 4, threads: 3)
        defer { reader.close() }
        var generator = SeededGenerator.forTest("randomReads(\(kind))")
        let directory = try TestDirectory("random")
        for round in 0..<4 {
            let fileSize = [0, 1, 4095, 4096, 12_345, 3 << 20][Int.random(in: 0..<6, using: &generator)] + round
            let contents = randomBytes(fileSize, using: &generator)
            let path = try directory.file("data\(round)", bytes: contents)
            let descriptor = try FileDescriptor.open(path, .readOnly)
            defer { _ = try? descriptor.close() }
            let (plan, bufferSize) = planReads(count: 100, fileSize: fileSize, maxLength: 256 << 10, using: &generator)
            try await readAndVerify(plan, bufferSize: bufferSize, from: descriptor, contents: contents, using: reader)
        }
    }

    @Test("many tasks share one reader", arguments: ReaderKind.allCases)
    func concurrentCallers(kind: ReaderKind) async throws {
        let reader = try kind.make(queueDepth: 8, threads: 4)
        defer { reader.close() }
        var generator = SeededGenerator.forTest("concurrentCallers(\(kind))")
        let directory = try TestDirectory("concurrent")
        let fileSize = 2 << 20
        let contents = randomBytes(fileSize, using: &generator)
        let path = try directory.file("data", bytes: contents)
        let descriptor = try FileDescriptor.open(path, .readOnly)
        defer { _ = try? descriptor.close() }
        let seeds = (0..<24).map { _ in generator.next() }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for (taskIndex, seed) in seeds.enumerated() {
                group.addTask {
                    var taskGenerator = SeededGenerator(seed: seed)
                    for batch in 0..<4 {
                        let count = Int.random(in: 1...40, using: &taskGenerator)
                        let (plan, bufferSize) = planReads(count: count, fileSize: fileSize, maxLength: 64 << 10, using: &taskGenerator)
                        try await readAndVerify(
                            plan, bufferSize: bufferSize, from: descriptor, contents: contents, using: reader,
                            tagBase: UInt64(taskIndex) << 32 | UInt64(batch) << 16
                        )
                    }
                }
            }
            try await group.waitForAll()
        }
    }

    @Test("reads longer than one kernel call are finished in several", arguments: ReaderKind.allCases)
    func remainderIsResubmitted(kind: ReaderKind) async throws {
        // 1000 bytes per kernel call: every read below needs many calls, each one a partial read
        // that must be continued where it stopped.
        let reader = try kind.make(queueDepth: 2, threads: 2, maxBytesPerCall: 1000)
        defer { reader.close() }
        var generator = SeededGenerator.forTest("remainderIsResubmitted(\(kind))")
        let directory = try TestDirectory("remainder")
        let fileSize = 300_001
        let contents = randomBytes(fileSize, using: &generator)
        let path = try directory.file("data", bytes: contents)
        let descriptor = try FileDescriptor.open(path, .readOnly)
        defer { _ = try? descriptor.close() }
        let plan = [
            PlannedRead(offset: 0, length: 100_000, bufferOffset: 0, expectedCount: 100_000),
            PlannedRead(offset: 123, length: 99_877, bufferOffset: 100_000, expectedCount: 99_877),
            PlannedRead(offset: 250_000, length: 100_000, bufferOffset: 199_877, expectedCount: 50_001),
        ]
        try await readAndVerify(plan, bufferSize: 299_877, from: descriptor, contents: contents, using: reader)
    }

    @Test("short read at end of file reports the bytes read", arguments: ReaderKind.allCases)
    func shortReadAtEnd(kind: ReaderKind) async throws {
        let reader = try kind.make()
        defer { reader.close() }
        var generator = SeededGenerator.forTest("shortReadAtEnd(\(kind))")
        let directory = try TestDirectory("eof")
        let contents = randomBytes(10_000, using: &generator)
        let path = try directory.file("data", bytes: contents)
        let descriptor = try FileDescriptor.open(path, .readOnly)
        defer { _ = try? descriptor.close() }
        let plan = [
            PlannedRead(offset: 8192, length: 4096, bufferOffset: 0, expectedCount: 1808),
            PlannedRead(offset: 9_999, length: 2, bufferOffset: 4096, expectedCount: 1),
            PlannedRead(offset: 10_000, length: 100, bufferOffset: 4098, expectedCount: 0),
            PlannedRead(offset: 1 << 40, length: 100, bufferOffset: 4198, expectedCount: 0),
        ]
        try await readAndVerify(plan, bufferSize: 4298, from: descriptor, contents: contents, using: reader)
    }

    @Test("bad descriptors and bad requests fail their own completion only", arguments: ReaderKind.allCases)
    func errorsAreCompletions(kind: ReaderKind) async throws {
        let reader = try kind.make()
        defer { reader.close() }
        let directory = try TestDirectory("errors")
        let contents = [UInt8](repeating: 7, count: 8192)
        let path = try directory.file("data", bytes: contents)
        let readable = try FileDescriptor.open(path, .readOnly)
        defer { _ = try? readable.close() }
        let writeOnly = try FileDescriptor.open(path, .writeOnly)
        defer { _ = try? writeOnly.close() }
        let folder = try FileDescriptor.open(FilePath(directory.path), .readOnly, options: [.directory])
        defer { _ = try? folder.close() }

        var buffer = try AlignedBuffer(capacity: 8 * 4096)
        let completions = await buffer.withUnsafeMutableBytes { raw in
            func slice(_ index: Int) -> UnsafeMutableRawBufferPointer {
                UnsafeMutableRawBufferPointer(rebasing: raw[(index * 4096)..<((index + 1) * 4096)])
            }
            return await reader.read([
                ReadRequest(descriptor: FileDescriptor(rawValue: -1), offset: 0, length: 100, destination: slice(0), tag: 10),
                ReadRequest(descriptor: writeOnly, offset: 0, length: 100, destination: slice(1), tag: 11),
                ReadRequest(descriptor: folder, offset: 0, length: 100, destination: slice(2), tag: 12),
                ReadRequest(descriptor: readable, offset: 0, length: 4096, destination: slice(3), tag: 13),
                ReadRequest(descriptor: readable, offset: -1, length: 10, destination: slice(4), tag: 14),
                ReadRequest(descriptor: readable, offset: 0, length: 4097, destination: slice(5), tag: 15),
                ReadRequest(descriptor: readable, offset: 0, length: 0, destination: slice(6), tag: 16),
                ReadRequest(descriptor: readable, offset: 1, length: 4096, destination: slice(7), tag: 17, isDirect: true),
            ])
        }
        #expect(completions.map(\.tag) == [10, 11, 12, 13, 14, 15, 16, 17])
        #expect(completions[0].result == .failure(.system(.badFileDescriptor)))
        #expect(completions[1].result == .failure(.system(.badFileDescriptor)))
        #expect(completions[2].result == .failure(.system(.isDirectory)))
        #expect(completions[3].result == .success(4096))
        #expect(completions[4].result == .failure(.invalidRequest))
        #expect(completions[5].result == .failure(.invalidRequest))
        #expect(completions[6].result == .success(0))
        #expect(completions[7].result == .failure(.misaligned))
        buffer.withUnsafeBytes { raw in
            #expect(raw[(3 * 4096)..<(4 * 4096)].allSatisfy { $0 == 7 })
        }
    }

    @Test("an empty batch returns at once", arguments: ReaderKind.allCases)
    func emptyBatch(kind: ReaderKind) async throws {
        let reader = try kind.make()
        defer { reader.close() }
        #expect(await reader.read([]).isEmpty)
    }

    @Test("a closed reader fails every read", arguments: ReaderKind.allCases)
    func closedReaderFails(kind: ReaderKind) async throws {
        let reader = try kind.make()
        let directory = try TestDirectory("closed")
        let path = try directory.file("data", bytes: [UInt8](repeating: 1, count: 4096))
        let descriptor = try FileDescriptor.open(path, .readOnly)
        defer { _ = try? descriptor.close() }
        reader.close()
        reader.close()  // a second close does nothing
        var buffer = try AlignedBuffer(capacity: 4096)
        let result = await buffer.withUnsafeMutableBytes { raw in
            await reader.read([ReadRequest(descriptor: descriptor, offset: 0, length: 4096, destination: raw, tag: 1)])
        }
        #expect(result == [ReadCompletion(tag: 1, result: .failure(.readerClosed))])
    }

    @Test("path names the implementation and its size")
    func pathReportsImplementation() throws {
        let pread = try ReaderKind.pread.make(threads: 3)
        defer { pread.close() }
        #expect(pread.path == .preadPool(threads: 3))
        let ring = try ReaderKind.ioUring.make(queueDepth: 5)
        defer { ring.close() }
        #expect(ring.path == .ioUring(queueDepth: 8))  // the kernel rounds up to a power of two
    }
}

/// io_uring-only behaviour.
@Suite("io_uring reader", .timeLimit(.minutes(1)))
struct URingReaderTests {
    @Test("close fails a read that would never complete and returns")
    func closeCancelsBlockedRead() async throws {
        let reader = try ReaderKind.ioUring.make(queueDepth: 4)
        var ends: [Int32] = [0, 0]
        try #require(pipe(&ends) == 0)
        defer {
            Glibc.close(ends[0])
            Glibc.close(ends[1])
        }
        let readEnd = FileDescriptor(rawValue: ends[0])
        // A pipe with no data: the read stays in flight until close cancels it.
        let pending = Task {
            var buffer = try AlignedBuffer(capacity: 4096)
            return await buffer.withUnsafeMutableBytes { raw in
                await reader.read([ReadRequest(descriptor: readEnd, offset: 0, length: 100, destination: raw, tag: 5)])
            }
        }
        try await Task.sleep(for: .milliseconds(200))
        // close() blocks until the kernel has given the buffer back; run it aside and poll, so a
        // close that hangs fails this test instead of hanging the run.
        let closed = Flag()
        Task.detached {
            reader.close()
            closed.set()
        }
        for _ in 0..<100 where !closed.isSet {
            try await Task.sleep(for: .milliseconds(100))
        }
        try #require(closed.isSet, "close() did not return within 10 s with a read in flight")
        let completions = try await pending.value
        #expect(completions == [ReadCompletion(tag: 5, result: .failure(.readerClosed))])
    }
}

/// A one-way flag shared between tasks.
final class Flag: Sendable {
    private let value = Atomic<Bool>(false)
    var isSet: Bool { value.load(ordering: .acquiring) }
    func set() { value.store(true, ordering: .releasing) }
}
