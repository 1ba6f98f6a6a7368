@preconcurrency import Glibc
import FoundationEssentials
import KVTierIO
import KVTierStore
import Logging
import Testing

let diskTestLogger: Logger = {
    var logger = Logger(label: "kvtier.disk-test")
    logger.logLevel = .critical
    return logger
}()

/// How a test's `PosixStorage` reads: both must serve the same bytes.
enum ReadPathChoice: String, CaseIterable, Sendable, CustomStringConvertible {
    case ioUring = "io_uring"
    case pread = "pread"

    var description: String { rawValue }

    /// A reader of this kind, or why there is none here (io_uring blocked by seccomp, old kernel).
    func makeReader() -> Result<any BlockReader, ReaderUnavailable> {
        switch self {
        case .ioUring:
            do { return .success(try URingReader(logger: diskTestLogger)) } catch { return .failure(ReaderUnavailable(reason: "\(error)")) }
        case .pread:
            // What `KVTIER_IO_URING=off` selects in `BlockReaders.make`; built directly so tests
            // running in parallel need not change the process environment.
            do { return .success(try PreadReader(threads: 4, logger: diskTestLogger)) } catch { return .failure(ReaderUnavailable(reason: "\(error)")) }
        }
    }
}

struct ReaderUnavailable: Error, CustomStringConvertible {
    var reason: String
    var description: String { reason }
}

/// A fresh directory under /tmp, removed by `remove()`.
struct TemporaryDirectory {
    let path: String

    init(_ prefix: String) throws {
        var template = Array("/tmp/\(prefix)-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { buffer -> String? in
            mkdtemp(buffer.baseAddress!).map { String(cString: $0) }
        }
        guard let made else { throw TestFailure("mkdtemp failed: errno \(errno)") }
        path = made
    }

    func remove() {
        try? FileManager.default.removeItem(atPath: path)
    }
}

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Opens a disk tier on real files under `root` reading through `choice`; the reader must be
/// closed by the caller after the tier is done.
func openTier(
    root: String, choice: ReadPathChoice, configuration: DiskTierConfiguration = DiskTierConfiguration()
) throws -> (DiskTier, any BlockReader) {
    let reader: any BlockReader
    switch choice.makeReader() {
    case .success(let made): reader = made
    case .failure(let why): throw TestFailure("no \(choice) reader: \(why)")
    }
    let storage = PosixStorage(root: root, reader: reader, logger: diskTestLogger)
    do {
        return (try DiskTier(storage: storage, configuration: configuration, logger: diskTestLogger), reader)
    } catch {
        reader.close()
        throw error
    }
}

/// Whether io_uring can be set up here; the reason when it cannot.
let ioUringUnavailableReason: String? = {
    switch ReadPathChoice.ioUring.makeReader() {
    case .success(let reader):
        reader.close()
        return nil
    case .failure(let why):
        return why.reason
    }
}()

/// Reads a whole file (test inputs and logs: small).
func readWholeFile(_ path: String) -> [UInt8]? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var contents: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { break }
        contents += chunk[0..<n]
    }
    return contents
}

/// Overwrites bytes of a file in place with plain buffered I/O, as bit rot would look to a reader.
func flipBits(in path: String, at offset: Int, mask: UInt8 = 0x10) throws {
    let fd = open(path, O_RDWR | O_CLOEXEC)
    guard fd >= 0 else { throw TestFailure("open \(path): errno \(errno)") }
    defer { close(fd) }
    var byte: UInt8 = 0
    guard pread(fd, &byte, 1, off_t(offset)) == 1 else { throw TestFailure("pread \(path)@\(offset): errno \(errno)") }
    byte ^= mask
    guard pwrite(fd, &byte, 1, off_t(offset)) == 1 else { throw TestFailure("pwrite \(path)@\(offset): errno \(errno)") }
    guard fsync(fd) == 0 else { throw TestFailure("fsync \(path): errno \(errno)") }
}
