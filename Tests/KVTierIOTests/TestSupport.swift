@preconcurrency import Glibc
import Logging
import Synchronization
import SystemPackage
import Testing
@testable import KVTierIO

/// SplitMix64: a seeded generator so any failure reproduces from the printed seed.
struct SeededGenerator: RandomNumberGenerator {
    private var state: UInt64

    init(seed: UInt64) { state = seed }

    /// A generator seeded from `KVTIER_TEST_SEED` when set, otherwise at random; prints the seed.
    static func forTest(_ name: String) -> SeededGenerator {
        let seed: UInt64
        if let text = getenv("KVTIER_TEST_SEED").map({ String(cString: $0) }), let parsed = UInt64(text) {
            seed = parsed
        } else {
            seed = UInt64.random(in: 0...UInt64.max)
        }
        print("\(name): seed \(seed) (rerun with KVTIER_TEST_SEED=\(seed))")
        return SeededGenerator(seed: seed)
    }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// A directory for test files on the package's disk (under `.build`, not /tmp, which may be tmpfs);
/// removed with its files when the value goes away.
final class TestDirectory {
    let path: String

    init(_ name: String) throws {
        let packageRoot = String(#filePath.split(separator: "/").dropLast(3).joined(separator: "/"))
        let base = "/\(packageRoot)/.build/kvtier-io-tests"
        mkdir(base, 0o755)
        path = "\(base)/\(name)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        guard mkdir(path, 0o755) == 0 else { throw Errno(rawValue: errno) }
    }

    deinit {
        if let directory = opendir(path) {
            while let entry = readdir(directory) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                    String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
                }
                if name != "." && name != ".." { unlink("\(path)/\(name)") }
            }
            closedir(directory)
        }
        rmdir(path)
    }

    /// Writes `bytes` to a new file and returns its path.
    func file(_ name: String, bytes: [UInt8]) throws -> FilePath {
        let filePath = FilePath("\(path)/\(name)")
        let descriptor = try FileDescriptor.open(
            filePath, .writeOnly, options: [.create, .truncate], permissions: [.ownerReadWrite]
        )
        defer { _ = try? descriptor.close() }
        _ = try bytes.withUnsafeBytes { try descriptor.writeAll($0) }
        return filePath
    }
}

func randomBytes(_ count: Int, using generator: inout SeededGenerator) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    bytes.withUnsafeMutableBytes { raw in
        var index = 0
        while index + 8 <= count {
            raw.storeBytes(of: generator.next(), toByteOffset: index, as: UInt64.self)
            index += 8
        }
        while index < count {
            raw[index] = UInt8(truncatingIfNeeded: generator.next())
            index += 1
        }
    }
    return bytes
}

/// The two implementations, so each behaviour is tested on both.
enum ReaderKind: String, CaseIterable, Sendable, CustomStringConvertible {
    case ioUring
    case pread

    var description: String { rawValue }

    /// Makes the reader; cancels (skips) the test with the reason when io_uring is unavailable.
    func make(queueDepth: Int = 8, threads: Int = 4, maxBytesPerCall: Int = IOLimits.maxBytesPerCall) throws -> any BlockReader {
        let logger = Logger(label: "kvtier.io.test")
        switch self {
        case .ioUring:
            do {
                return try URingReader(queueDepth: queueDepth, logger: logger, maxBytesPerCall: maxBytesPerCall)
            } catch {
                print("skipping io_uring case: \(error)")
                try Test.cancel("io_uring unavailable: \(error)")
            }
        case .pread:
            return try PreadReader(threads: threads, logger: logger, maxBytesPerCall: maxBytesPerCall)
        }
    }
}

/// One planned read and what it should return.
struct PlannedRead {
    var offset: Int64
    var length: Int
    /// Offset of the destination within the caller's buffer.
    var bufferOffset: Int
    var expectedCount: Int
}

/// Random reads over a file of `fileSize` bytes: lengths from 0 to `maxLength`, some starting at
/// or past the end, laid out one after another in a buffer.
func planReads(count: Int, fileSize: Int, maxLength: Int, using generator: inout SeededGenerator) -> (reads: [PlannedRead], bufferSize: Int) {
    var reads: [PlannedRead] = []
    var cursor = 0
    for _ in 0..<count {
        let offset = Int.random(in: 0...(fileSize + 4096), using: &generator)
        let length: Int
        switch Int.random(in: 0..<10, using: &generator) {
        case 0: length = 0
        case 1: length = 1
        case 2: length = maxLength
        default: length = Int.random(in: 1...maxLength, using: &generator)
        }
        let expected = max(0, min(length, fileSize - offset))
        reads.append(PlannedRead(offset: Int64(offset), length: length, bufferOffset: cursor, expectedCount: expected))
        cursor += length
    }
    return (reads, cursor)
}

/// Reads `plan` from `descriptor` in one batch and checks every byte against `contents`.
func readAndVerify(
    _ plan: [PlannedRead],
    bufferSize: Int,
    from descriptor: FileDescriptor,
    contents: [UInt8],
    using reader: any BlockReader,
    tagBase: UInt64 = 0
) async throws {
    var buffer = try AlignedBuffer(capacity: bufferSize)
    let completions = await buffer.withUnsafeMutableBytes { raw in
        let requests = plan.enumerated().map { index, read in
            ReadRequest(
                descriptor: descriptor,
                offset: read.offset,
                length: read.length,
                destination: UnsafeMutableRawBufferPointer(rebasing: raw[read.bufferOffset..<(read.bufferOffset + read.length)]),
                tag: tagBase + UInt64(index)
            )
        }
        return await reader.read(requests)
    }
    try #require(completions.count == plan.count)
    buffer.withUnsafeBytes { raw in
        for (index, read) in plan.enumerated() {
            let completion = completions[index]
            #expect(completion.tag == tagBase + UInt64(index))
            #expect(completion.result == .success(read.expectedCount), "read \(index) at \(read.offset) length \(read.length)")
            guard case .success(let count) = completion.result, count == read.expectedCount, count > 0 else { continue }
            let same = sameBytes(raw, at: read.bufferOffset, contents, at: Int(read.offset), count: count)
            #expect(same, "bytes of read \(index) at \(read.offset) length \(read.length)")
        }
    }
}

/// Collects log events, to check what a library logs.
final class LogCapture: Sendable {
    struct Entry: Sendable {
        var level: Logger.Level
        var message: String
        var metadata: Logger.Metadata
    }

    let entries = Mutex<[Entry]>([])

    var logger: Logger {
        Logger(label: "kvtier.io.test.capture") { _ in CapturingHandler(capture: self) }
    }

    struct CapturingHandler: LogHandler {
        let capture: LogCapture
        var metadata: Logger.Metadata = [:]
        var metadataProvider: Logger.MetadataProvider?
        var logLevel: Logger.Level = .trace

        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }

        func log(event: LogEvent) {
            let entry = Entry(level: event.level, message: event.message.description, metadata: event.metadata ?? [:])
            capture.entries.withLock { $0.append(entry) }
        }
    }
}

/// memcmp of two ranges (element-wise comparison is too slow for megabytes in debug builds).
func sameBytes(_ buffer: UnsafeRawBufferPointer, at bufferOffset: Int, _ contents: [UInt8], at contentsOffset: Int, count: Int) -> Bool {
    guard count > 0 else { return true }
    guard bufferOffset >= 0, contentsOffset >= 0, bufferOffset + count <= buffer.count,
          contentsOffset + count <= contents.count, let base = buffer.baseAddress
    else { return false }
    return contents.withUnsafeBytes { expected in
        memcmp(base + bufferOffset, expected.baseAddress.unsafelyUnwrapped + contentsOffset, count) == 0
    }
}
