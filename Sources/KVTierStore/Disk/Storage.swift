import KVTierCore

/// The file system as the disk tier sees it. `KVTierIO.PosixStorage` is the real one;
/// `SimulatedStorage` (the KVTierStoreTesting target, for tests only) keeps files in memory and injects torn writes, bit flips and full disks from
/// a seed, so every failure a test finds can be replayed.
///
/// Paths are relative to the storage's root. Durability follows POSIX: file contents are durable
/// after `StorageFile.sync()`, names (create, rename, remove) after `syncDirectory`.
public protocol Storage: AnyObject, Sendable {
    /// Creates a directory (and its parents); succeeds if it exists.
    func makeDirectory(_ path: String) throws(StorageError)
    /// Names in a directory, without `.` and `..`, in no particular order.
    func list(_ directory: String) throws(StorageError) -> [String]
    func open(_ path: String, _ mode: OpenMode) throws(StorageError) -> any StorageFile
    func exists(_ path: String) -> Bool
    /// Atomically replaces `to` with `from`.
    func rename(_ from: String, _ to: String) throws(StorageError)
    func remove(_ path: String) throws(StorageError)
    /// Makes the names in `directory` durable.
    func syncDirectory(_ directory: String) throws(StorageError)
    /// Reads a batch of byte ranges, each into its own destination, as concurrently as the
    /// storage can (io_uring with a deep queue for the real one). Results come back in request
    /// order: bytes read (short only at end of file) or the error.
    func read(_ requests: [BlockRead]) async -> [Result<Int, StorageError>]
    /// How reads are served, for status output: e.g. "io_uring qd=64" or "pread pool (4 threads)".
    var readPath: String { get }
}

public enum OpenMode: Sendable {
    /// Reading only; fails if missing.
    case read
    /// Reading and writing; created empty if missing.
    case readWriteCreate
}

/// An open file. Writes are positional; `sync()` is fdatasync.
public protocol StorageFile: AnyObject, Sendable {
    var path: String { get }
    func write(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws(StorageError)
    /// Reads up to `buffer.count` bytes at `offset`; fewer only at end of file.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(StorageError) -> Int
    func sync() throws(StorageError)
    func truncate(to size: Int) throws(StorageError)
    func size() throws(StorageError) -> Int
    func close()
}

/// One range of a batched read. `destination` must stay valid until `Storage.read` returns;
/// `PageBuffer` is how the disk tier guarantees that.
public struct BlockRead: @unchecked Sendable {
    // Invariant: the caller keeps `destination` alive and untouched until the read returns.
    public var file: any StorageFile
    public var offset: Int
    public var destination: UnsafeMutableRawBufferPointer

    public init(file: any StorageFile, offset: Int, destination: UnsafeMutableRawBufferPointer) {
        self.file = file
        self.offset = offset
        self.destination = destination
    }
}

/// A failed storage operation: which, on what, and the errno-style cause.
public struct StorageError: Error, Equatable, CustomStringConvertible {
    public enum Code: Equatable, Sendable {
        case noSpace
        case io
        case notFound
        case permission
        case closed
        case other(Int32)
    }

    public var code: Code
    public var operation: String
    public var path: String

    public init(_ code: Code, _ operation: String, _ path: String) {
        self.code = code
        self.operation = operation
        self.path = path
    }

    public var description: String {
        let cause: String
        switch code {
        case .noSpace: cause = "no space left on device (free space or raise the disk budget)"
        case .io: cause = "I/O error (check the device and kernel log)"
        case .notFound: cause = "no such file or directory"
        case .permission: cause = "permission denied (check the state directory's owner)"
        case .closed: cause = "file is closed"
        case .other(let errno): cause = "errno \(errno)"
        }
        return "\(operation) '\(path)': \(cause)"
    }
}

extension StorageFile {
    /// Writes a whole array at `offset`.
    public func write(_ bytes: [UInt8], at offset: Int) throws(StorageError) {
        let outcome = bytes.withUnsafeBytes { raw in
            Result { () throws(StorageError) in try write(raw, at: offset) }
        }
        try outcome.get()
    }
}
