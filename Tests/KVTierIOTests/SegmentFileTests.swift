@preconcurrency import Glibc
import SystemPackage
import Testing
@testable import KVTierIO

@Suite("Segment files and O_DIRECT", .timeLimit(.minutes(1)))
struct SegmentFileTests {
    @Test("O_DIRECT reads into aligned buffers, short at an unaligned end of file", arguments: ReaderKind.allCases)
    func directReads(kind: ReaderKind) async throws {
        // 8 KiB per kernel call so the larger reads also continue from aligned remainders.
        let reader = try kind.make(queueDepth: 4, maxBytesPerCall: 8192)
        defer { reader.close() }
        var generator = SeededGenerator.forTest("directReads(\(kind))")
        let directory = try TestDirectory("direct")
        let fileSize = (1 << 20) + 1000
        let contents = randomBytes(fileSize, using: &generator)
        let path = try directory.file("segment", bytes: contents)
        let file = try SegmentFile(forReadingAt: path)
        guard file.mode == .direct else {
            print("skipping O_DIRECT test: the file system under \(directory.path) refused O_DIRECT")
            try Test.cancel("file system refused O_DIRECT")
        }
        #expect(try file.size() == Int64(fileSize))

        let plan: [(offset: Int64, length: Int, expected: Int)] = [
            (0, 4096, 4096),
            (4096, 65536, 65536),
            (1 << 19, 1 << 19, 1 << 19),
            (1 << 20, 8192, 1000),  // the last 1000 bytes: short at end of file
            (Int64(1 << 20) + 4096, 4096, 0),
        ]
        let slot = 1 << 19
        var buffer = try AlignedBuffer(capacity: plan.count * slot + 4096)
        let completions = await buffer.withUnsafeMutableBytes { raw in
            var requests = plan.enumerated().map { index, read in
                file.readRequest(
                    offset: read.offset, length: read.length,
                    into: UnsafeMutableRawBufferPointer(rebasing: raw[(index * slot)..<((index + 1) * slot)]),
                    tag: UInt64(index)
                )
            }
            // Misaligned offset, length and address: checked before the kernel sees them.
            let spare = plan.count * slot
            requests.append(file.readRequest(offset: 512, length: 4096, into: UnsafeMutableRawBufferPointer(rebasing: raw[spare...]), tag: 90))
            requests.append(file.readRequest(offset: 0, length: 1000, into: UnsafeMutableRawBufferPointer(rebasing: raw[spare...]), tag: 91))
            requests.append(file.readRequest(offset: 0, length: 2048, into: UnsafeMutableRawBufferPointer(rebasing: raw[(spare + 512)...]), tag: 92))
            return await reader.read(requests)
        }
        for (index, read) in plan.enumerated() {
            #expect(completions[index].result == .success(read.expected), "read \(index)")
        }
        #expect(completions[plan.count].result == .failure(.misaligned))
        #expect(completions[plan.count + 1].result == .failure(.misaligned))
        #expect(completions[plan.count + 2].result == .failure(.misaligned))
        buffer.withUnsafeBytes { raw in
            for (index, read) in plan.enumerated() where read.expected > 0 {
                let same = sameBytes(raw, at: index * slot, contents, at: Int(read.offset), count: read.expected)
                #expect(same, "bytes of read \(index)")
            }
        }
    }

    @Test("AlignedBuffer.read hands its memory to one read", arguments: ReaderKind.allCases)
    func bufferRead(kind: ReaderKind) async throws {
        let reader = try kind.make()
        defer { reader.close() }
        var generator = SeededGenerator.forTest("bufferRead(\(kind))")
        let directory = try TestDirectory("bufferread")
        let contents = randomBytes(3 * 4096, using: &generator)
        let file = try SegmentFile(forReadingAt: try directory.file("segment", bytes: contents))
        var buffer = try AlignedBuffer(capacity: 2 * 4096)
        let result = await buffer.read(from: file, offset: 4096, length: 2 * 4096, using: reader)
        #expect(result == .success(2 * 4096))
        buffer.withUnsafeBytes { raw in
            let same = sameBytes(raw, at: 0, contents, at: 4096, count: 2 * 4096)
            #expect(same)
        }
        try file.close()
    }

    @Test("a file system without O_DIRECT falls back to buffered reads")
    func fallbackToBuffered() async throws {
        let directory = try TestDirectory("fallback")
        let contents = [UInt8](repeating: 3, count: 5000)
        let path = try directory.file("segment", bytes: contents)
        let directFlag = SegmentFile.directOption
        var attempts: [FileDescriptor.OpenOptions] = []
        // Plays a file system that refuses O_DIRECT with EINVAL, as tmpfs did before Linux 6.6.
        let file = try SegmentFile(forReadingAt: path, preferDirect: true) { (path, options) throws(Errno) in
            attempts.append(options)
            if options.contains(directFlag) { throw Errno.invalidArgument }
            do { return try FileDescriptor.open(path, .readOnly, options: options) } catch { throw error as? Errno ?? .ioError }
        }
        #expect(file.mode == .buffered)
        #expect(attempts.count == 2)
        #expect(attempts.first?.contains(directFlag) == true)
        #expect(attempts.last?.contains(directFlag) == false)
        try file.dropCachedPages()
        let reader = try ReaderKind.pread.make()
        defer { reader.close() }
        var buffer = try AlignedBuffer(capacity: 5000)
        // Unaligned length is fine once buffered.
        #expect(await buffer.read(from: file, offset: 0, length: 5000, using: reader) == .success(5000))
    }

    @Test("other open errors are reported, not retried buffered")
    func openErrorsPropagate() throws {
        #expect(throws: Errno.noSuchFileOrDirectory) {
            _ = try SegmentFile(forReadingAt: "/nonexistent/kvtier/segment")
        }
    }

    @Test("preferDirect false opens buffered")
    func bufferedOnRequest() throws {
        let directory = try TestDirectory("buffered")
        let path = try directory.file("segment", bytes: [1, 2, 3])
        let file = try SegmentFile(forReadingAt: path, preferDirect: false)
        #expect(file.mode == .buffered)
        #expect(try file.size() == 3)
    }
}
