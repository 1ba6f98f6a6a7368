@preconcurrency import Glibc
import KVTierStore
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
            if mkdir(prefix, 0o750) != 0 && errno != EEXIST { throw Self.error(errno, "mkdir", prefix) }
        }
    }

    public func list(_ directory: String) throws(StorageError) -> [String] {
        let path = absolute(directory)
        guard let handle = opendir(path) else { throw Self.error(errno, "opendir", path) }
        defer { closedir(handle) }
        var names: [String] = []
        while let entry = readdir(handle) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    public func exists(_ path: String) -> Bool { access(absolute(path), F_OK) == 0 }

    public func open(_ path: String, _ mode: OpenMode) throws(StorageError) -> any StorageFile {
        let full = absolute(path)
        // O_NOFOLLOW: a symbolic link planted in the state directory is refused (ELOOP), never
        // followed to a file someone else chose.
        let flags: Int32 = (mode == .read ? O_RDONLY | O_CLOEXEC : O_RDWR | O_CREAT | O_CLOEXEC) | O_NOFOLLOW
        let fd = Glibc.open(full, flags, 0o640)
        guard fd >= 0 else {
            if errno == ELOOP { throw Self.error(ELOOP, "open (a symbolic link: kvtierd never follows links in its state directory; remove it)", full) }
            throw Self.error(errno, "open", full)
        }
        return PosixFile(descriptor: fd, path: full, logger: logger)
    }

    public func rename(_ from: String, _ to: String) throws(StorageError) {
        if Glibc.rename(absolute(from), absolute(to)) != 0 { throw Self.error(errno, "rename", absolute(from)) }
    }

    public func remove(_ path: String) throws(StorageError) {
        if unlink(absolute(path)) != 0 { throw Self.error(errno, "unlink", absolute(path)) }
    }

    public func syncDirectory(_ directory: String) throws(StorageError) {
        let path = absolute(directory)
        let fd = Glibc.open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw Self.error(errno, "open directory", path) }
        defer { Glibc.close(fd) }
        if fsync(fd) != 0 { throw Self.error(errno, "fsync directory", path) }
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
    let descriptor: Int32
    let path: String
    let logger: Logger
    private let direct = Mutex<DirectHandle?>(nil)

    final class DirectHandle: @unchecked Sendable {
        // Invariant: immutable after init; closed in deinit only.
        let file: SegmentFile
        init(_ file: consuming SegmentFile) { self.file = file }
    }

    init(descriptor: Int32, path: String, logger: Logger) {
        self.descriptor = descriptor
        self.path = path
        self.logger = logger
    }

    deinit { Glibc.close(descriptor) }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws(StorageError) {
        var done = 0
        while done < bytes.count {
            let n = pwrite(descriptor, bytes.baseAddress! + done, bytes.count - done, off_t(offset + done))
            if n < 0 {
                if errno == EINTR { continue }
                throw PosixStorage.error(errno, "write", path)
            }
            done += n
        }
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(StorageError) -> Int {
        var done = 0
        while done < buffer.count {
            let n = pread(descriptor, buffer.baseAddress! + done, buffer.count - done, off_t(offset + done))
            if n < 0 {
                if errno == EINTR { continue }
                throw PosixStorage.error(errno, "read", path)
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    func sync() throws(StorageError) {
        while fdatasync(descriptor) != 0 {
            if errno != EINTR { throw PosixStorage.error(errno, "fdatasync", path) }
        }
    }

    func truncate(to size: Int) throws(StorageError) {
        if ftruncate(descriptor, off_t(size)) != 0 { throw PosixStorage.error(errno, "ftruncate", path) }
    }

    func size() throws(StorageError) -> Int {
        var info = stat()
        if fstat(descriptor, &info) != 0 { throw PosixStorage.error(errno, "fstat", path) }
        return Int(info.st_size)
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
