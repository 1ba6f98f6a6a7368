import SystemPackage

/// One read of a batch: `length` bytes at `offset` of `descriptor` into `destination`.
///
/// The caller keeps `destination` alive and untouched until the `read` call that carries this
/// request returns. With `isDirect` (the file is open with O_DIRECT) the offset, the length and
/// the destination address must be multiples of `IOLimits.directIOAlignment`; the reader checks
/// that and fails the request with `ReadError.misaligned` instead of asking the kernel.
// Invariant for @unchecked Sendable: a request only carries the destination to the reader, which
// writes it from one thread at a time until the batch's `read` returns; the caller does not touch
// it meanwhile (documented contract above).
public struct ReadRequest: @unchecked Sendable {
    /// The file to read.
    public var descriptor: FileDescriptor
    /// Byte offset in the file; must not be negative.
    public var offset: Int64
    /// Bytes to read; must not exceed `destination.count`.
    public var length: Int
    /// Where the bytes go: pointer and capacity.
    public var destination: UnsafeMutableRawBufferPointer
    /// The caller's name for this request, echoed in its completion.
    public var tag: UInt64
    /// Whether the descriptor is open with O_DIRECT, so alignment is checked.
    public var isDirect: Bool

    public init(
        descriptor: FileDescriptor,
        offset: Int64,
        length: Int,
        destination: UnsafeMutableRawBufferPointer,
        tag: UInt64,
        isDirect: Bool = false
    ) {
        self.descriptor = descriptor
        self.offset = offset
        self.length = length
        self.destination = destination
        self.tag = tag
        self.isDirect = isDirect
    }
}

/// The outcome of one `ReadRequest`.
public struct ReadCompletion: Sendable, Hashable {
    /// The request's tag.
    public var tag: UInt64
    /// Bytes read — fewer than asked only when the file ended first — or why the read failed.
    public var result: Result<Int, ReadError>

    public init(tag: UInt64, result: Result<Int, ReadError>) {
        self.tag = tag
        self.result = result
    }
}

/// Why a read failed.
public enum ReadError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The kernel refused the read (EBADF: descriptor not open for reading; EIO: device error;
    /// EINVAL: O_DIRECT constraints of the file system not met; …).
    case system(Errno)
    /// An O_DIRECT request whose offset, length or destination address is not a multiple of
    /// `IOLimits.directIOAlignment`.
    case misaligned
    /// A negative offset or length, or a length larger than the destination.
    case invalidRequest
    /// The reader was closed before the read completed.
    case readerClosed

    public var description: String {
        switch self {
        case .system(let errno):
            return "read failed: \(errno) (errno \(errno.rawValue))"
        case .misaligned:
            return "O_DIRECT read not aligned: round the offset and length to \(IOLimits.directIOAlignment) bytes and read into an AlignedBuffer"
        case .invalidRequest:
            return "invalid read request: offset and length must be non-negative and the length must fit the destination"
        case .readerClosed:
            return "the block reader was closed before the read completed: reopen the reader"
        }
    }
}

/// Which implementation serves reads, for metrics and status.
public enum IOPath: Sendable, Hashable, CustomStringConvertible {
    /// One io_uring ring with this many submission queue entries.
    case ioUring(queueDepth: Int)
    /// A pool of this many threads calling pread.
    case preadPool(threads: Int)

    public var description: String {
        switch self {
        case .ioUring(let queueDepth): return "io_uring(queueDepth: \(queueDepth))"
        case .preadPool(let threads): return "pread(threads: \(threads))"
        }
    }
}

/// Reads batches of blocks from files.
public protocol BlockReader: AnyObject, Sendable {
    /// Reads every request of `batch` and returns when all have completed.
    ///
    /// - Returns: one completion per request, in the order of `batch`. A request that reaches end
    ///   of file reports the bytes actually read; errors never throw and never crash.
    func read(_ batch: [ReadRequest]) async -> [ReadCompletion]

    /// The implementation in use.
    var path: IOPath { get }

    /// Stops the reader: reads not yet complete fail with `ReadError.readerClosed` and later reads
    /// fail at once. Returns when the reader's threads have stopped; calling it again does nothing.
    func close()
}
