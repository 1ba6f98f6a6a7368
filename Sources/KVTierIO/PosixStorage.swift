@preconcurrency import Glibc
import KVTierStore
import KVTierSystem
import Logging
import Synchronization
import SystemPackage

/// The real `Storage`: files under a root directory, positional writes with fdatasync, and
/// batched reads through a `BlockReader` (io_uring, or the pread pool where io_uring is not
/// allowed) on a second, O_DIRECT descriptor per file so cold reads skip the page cache.
public final class PosixStorage: Storage {
    public let root: String
    let reader: any BlockReader
    let logger: Logger

    public init(root: String, reader: any BlockReader, logger: Logger) {
        self.root = root.hasSuffix("/") ? String(root.dropLast()) : root
        self.reader = reader
        self.logger = logger
    }

    public var readPath: String { reader.path.description }

    func absolute(_ path: String) -> String { path.isEmpty ? root : "\(root)/\(path)" }

    /// Creates `path` under the root, and the root itself, as `mkdir -p` would.
    public func makeDirectory(_ path: String) throws(StorageError) {
        let full = absolute(path)
        var prefix = full.hasPrefix("/") ? "" : "."
        for part in full.split(separator: "/") {
            prefix += "/" + part
            do { try FileSystem.makeDirectory(prefix, mode: 0o750) } catch { throw Self.error(error, "mkdir", prefix) }
        }
    }

    public func list(_ directory: String) throws(StorageError) -> [String] {
        let path = absolute(directory)
        do { return try FileSystem.directoryEntries(path) } catch { throw Self.error(error, "opendir", path) }
    }

    public func exists(_ path: String) -> Bool { FileSystem.exists(absolute(path)) }

    public func open(_ path: String, _ mode: OpenMode) throws(StorageError) -> any StorageFile {
        let full = absolute(path)
        // O_NOFOLLOW: a symbolic link planted in the state directory is refused (ELOOP), never
        // followed to a file someone else chose.
        let flags: Int32 = (mode == .read ? O_RDONLY : O_RDWR | O_CREAT) | O_NOFOLLOW
        do {
            return PosixFile(descriptor: try FileDescriptor.open(path: full, flags: flags, mode: 0o640), path: full, logger: logger)
        } catch where error == .tooManySymbolicLinkLevels {
            throw Self.error(error, "open (a symbolic link: kvtierd never follows links in its state directory; remove it)", full)
        } catch {
            throw Self.error(error, "open", full)
        }
    }

    public func rename(_ from: String, _ to: String) throws(StorageError) {
        do { try FileSystem.rename(absolute(from), to: absolute(to)) } catch { throw Self.error(error, "rename", absolute(from)) }
    }

    public func remove(_ path: String) throws(StorageError) {
        do { try FileSystem.unlink(absolute(path)) } catch { throw Self.error(error, "unlink", absolute(path)) }
    }

    public func syncDirectory(_ directory: String) throws(StorageError) {
        let path = absolute(directory)
        do { try FileSystem.synchronizeDirectory(path) } catch { throw Self.error(error, "fsync directory", path) }
    }

    public func read(_ requests: [BlockRead]) async -> [Result<Int, StorageError>] {
        var prepared: [ReadRequest] = []
        var failures: [Int: StorageError] = [:]
        for (i, request) in requests.enumerated() {
            guard let file = request.file as? PosixFile else {
                failures[i] = StorageError(.other(EBADF), "read", request.file.path)
                continue
            }
            do {
                prepared.append(try file.readRequest(offset: request.offset, into: request.destination, tag: UInt64(i)))
            } catch {
                failures[i] = error
            }
        }
        let completions = await reader.read(prepared)
        var results = [Result<Int, StorageError>](repeating: .success(0), count: requests.count)
        for (i, failure) in failures { results[i] = .failure(failure) }
        for completion in completions {
            let i = Int(completion.tag)
            switch completion.result {
            case .success(let bytes): results[i] = .success(bytes)
            case .failure(.system(let errno)): results[i] = .failure(Self.error(errno.rawValue, "read", requests[i].file.path))
            case .failure(let other):
                results[i] = .failure(StorageError(.other(EINVAL), "read (\(other))", requests[i].file.path))
            }
        }
        return results
    }

    static func error(_ errno: Errno, _ operation: String, _ path: String) -> StorageError {
        error(errno.rawValue, operation, path)
    }

    static func error(_ code: Int32, _ operation: String, _ path: String) -> StorageError {
        let mapped: StorageError.Code
        switch code {
        case ENOSPC, EDQUOT: mapped = .noSpace
        case EIO: mapped = .io
        case ENOENT: mapped = .notFound
        case EACCES, EPERM, EROFS: mapped = .permission
        case EBADF: mapped = .closed
        default: mapped = .other(code)
        }
        return StorageError(mapped, operation, path)
    }
}

/// A file of `PosixStorage`: one read-write descriptor for appends and small reads, and a lazily
/// opened read-only descriptor (O_DIRECT where the file system allows) for batched page reads.
final class PosixFile: StorageFile, @unchecked Sendable {
    // Invariant: `descriptor` is immutable after init; `direct` is set once under `lock`.
    let descriptor: FileDescriptor
    let path: String
    let logger: Logger
    private let direct = Mutex<DirectHandle?>(nil)

    final class DirectHandle: @unchecked Sendable {
        // Invariant: immutable after init; closed in deinit only.
        let file: SegmentFile
        init(_ file: consuming SegmentFile) { self.file = file }
    }

    init(descriptor: FileDescriptor, path: String, logger: Logger) {
        self.descriptor = descriptor
        self.path = path
        self.logger = logger
    }

    deinit { descriptor.closeIgnoringErrors() }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws(StorageError) {
        do { try descriptor.writeAll(bytes, at: offset) } catch { throw PosixStorage.error(error, "write", path) }
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(StorageError) -> Int {
        do { return try descriptor.readFully(into: buffer, at: offset) } catch { throw PosixStorage.error(error, "read", path) }
    }

    func sync() throws(StorageError) {
        do { try descriptor.synchronizeData() } catch { throw PosixStorage.error(error, "fdatasync", path) }
    }

    func truncate(to size: Int) throws(StorageError) {
        do { try descriptor.truncate(to: size) } catch { throw PosixStorage.error(error, "ftruncate", path) }
    }

    func size() throws(StorageError) -> Int {
        do { return Int(try descriptor.status().st_size) } catch { throw PosixStorage.error(error, "fstat", path) }
    }

    func close() {}

    /// A read of `destination.count` bytes at `offset` on the direct descriptor.
    func readRequest(offset: Int, into destination: UnsafeMutableRawBufferPointer, tag: UInt64) throws(StorageError) -> ReadRequest {
        let handle = try directHandle()
        return handle.file.readRequest(offset: Int64(offset), length: destination.count, into: destination, tag: tag)
    }

    private func directHandle() throws(StorageError) -> DirectHandle {
        let outcome: Result<DirectHandle, StorageError> = direct.withLock { slot in
            if let slot { return .success(slot) }
            do throws(Errno) {
                let handle = DirectHandle(try SegmentFile(forReadingAt: FilePath(path), preferDirect: true))
                slot = handle
                return .success(handle)
            } catch {
                return .failure(PosixStorage.error(error.rawValue, "open for reading", path))
            }
        }
        return try outcome.get()
    }
}
