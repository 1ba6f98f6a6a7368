@preconcurrency import Glibc
import CKVTierURingShim
import KVTierSystem
import SystemPackage

/// How a segment file is read.
public enum SegmentReadMode: Sendable, Hashable, CustomStringConvertible {
    /// O_DIRECT: reads bypass the page cache and must be aligned (`IOLimits.directIOAlignment`).
    case direct
    /// Through the page cache, because the file system refused O_DIRECT (EINVAL). Drop pages that
    /// were read with `dropCachedPages` so cold data does not crowd the cache.
    case buffered

    public var description: String {
        switch self {
        case .direct: return "direct"
        case .buffered: return "buffered"
        }
    }
}

/// An append-only segment file open for reading; closes its descriptor when it goes away.
public struct SegmentFile: ~Copyable {
    /// The open descriptor, valid while this value lives.
    public let descriptor: FileDescriptor
    /// Whether reads bypass the page cache.
    public let mode: SegmentReadMode

    /// O_DIRECT, whose value depends on the architecture.
    static let directOption = FileDescriptor.OpenOptions(rawValue: kvt_open_flag_direct())

    /// Opens `path` read-only, with O_DIRECT when `preferDirect` and the file system supports it;
    /// on EINVAL from O_DIRECT it opens buffered instead and reports `.buffered` in `mode`.
    public init(forReadingAt path: FilePath, preferDirect: Bool = true) throws(Errno) {
        try self.init(forReadingAt: path, preferDirect: preferDirect, open: Self.openDescriptor)
    }

    /// The same, with the open call substituted, so tests can play a file system without O_DIRECT.
    init(
        forReadingAt path: FilePath,
        preferDirect: Bool,
        open: (FilePath, FileDescriptor.OpenOptions) throws(Errno) -> FileDescriptor
    ) throws(Errno) {
        let options: FileDescriptor.OpenOptions = [.closeOnExec, .noFollow]
        if preferDirect {
            do throws(Errno) {
                descriptor = try open(path, options.union(Self.directOption))
                mode = .direct
                return
            } catch where error == .invalidArgument {
                // The file system does not support O_DIRECT (some FUSE and older tmpfs); read
                // through the page cache instead.
            }
        }
        descriptor = try open(path, options)
        mode = .buffered
    }

    private static func openDescriptor(
        _ path: FilePath, _ options: FileDescriptor.OpenOptions
    ) throws(Errno) -> FileDescriptor {
        do {
            return try FileDescriptor.open(path, .readOnly, options: options, retryOnInterrupt: true)
        } catch let errno as Errno {
            throw errno
        } catch {
            throw Errno.ioError
        }
    }

    /// The file's size in bytes.
    public func size() throws(Errno) -> Int64 {
        Int64(try descriptor.status().st_size)
    }

    /// Asks the kernel to drop cached pages of the range (`length` 0: to the end of the file),
    /// `posix_fadvise(POSIX_FADV_DONTNEED)`. Harmless in `.direct` mode.
    public func dropCachedPages(offset: Int64 = 0, length: Int64 = 0) throws(Errno) {
        try descriptor.dropCachedPages(offset: offset, length: length)
    }

    /// A request to read `length` bytes at `offset` into `destination`, marked direct when this
    /// file is open with O_DIRECT.
    public func readRequest(
        offset: Int64,
        length: Int,
        into destination: UnsafeMutableRawBufferPointer,
        tag: UInt64
    ) -> ReadRequest {
        ReadRequest(
            descriptor: descriptor,
            offset: offset,
            length: length,
            destination: destination,
            tag: tag,
            isDirect: mode == .direct
        )
    }

    /// Closes the descriptor, reporting the error that `deinit` would swallow.
    public consuming func close() throws(Errno) {
        let descriptor = self.descriptor
        discard self
        do {
            try descriptor.close()
        } catch let errno as Errno {
            throw errno
        } catch {
            throw Errno.ioError
        }
    }

    deinit {
        _ = try? descriptor.close()
    }
}
