@preconcurrency import Glibc
import KVTierCore
import SystemPackage

/// A tenant's shared-memory arena (docs/protocol.md, "Shared memory"): a memfd, sized once and
/// mapped shared read-write. The daemon creates it with `init(name:capacity:)` and passes
/// `descriptor` to the tenant's clients, which map it with `map(descriptor:capacity:)`.
///
/// The file is sparse: memory is committed page by page when first touched (by any process),
/// and `release` gives it back. Which extents belong to whom is `ExtentAllocator`'s business; the
/// arena only checks that extents lie inside it.
///
/// Seals: the daemon's memfd is sealed against shrinking and growing (then the seals are sealed),
/// so a client holding the descriptor cannot truncate it and make the daemon's next access to
/// the arena fault with SIGBUS. `map` insists on that seal for the same reason in the client.
/// A `.clientsRead` arena (a tenant's page arena) is also sealed F_SEAL_FUTURE_WRITE once the
/// daemon has mapped it, so only the daemon's own mapping can write it; such an arena can no
/// longer `release` memory (EPERM), and clients map it read-only.
// Invariant for @unchecked Sendable: the value is non-copyable, so the mapping and descriptor
// have one owner; `base`, `capacity` and the descriptor never change while it lives, and the
// memory they reach is shared with other processes by design (extent ownership is the caller's).
public struct SharedArena: ~Copyable, @unchecked Sendable {
    /// A byte range of the arena (KVTierCore's `Extent`).
    public typealias Extent = KVTierCore.Extent

    /// Alignment of the capacity and of extents handed to `release`: the protocol's page size.
    public static var alignment: Int { Extent.granuleBytes }

    private let base: UnsafeMutableRawPointer
    private let fileDescriptor: FileDescriptor
    /// The system page size, which `release` rounds to (larger than 4096 on some arm64 kernels).
    private let systemPageBytes: Int
    /// Bytes mapped, a multiple of `alignment`.
    public let capacity: Int

    /// The memfd, to pass to clients with SCM_RIGHTS. Valid while this value lives; not to be
    /// closed by the caller.
    public var descriptor: Int32 { fileDescriptor.rawValue }

    /// Who may write an arena besides the daemon.
    public enum Sharing: Sendable, Equatable {
        /// Clients map it read-write (the staging arena: where they write pages before a PUT).
        case clientsWrite
        /// Clients can only read it (the page arena: pages served to every process of the
        /// tenant). Sealed with F_SEAL_FUTURE_WRITE after the daemon mapped it read-write, so
        /// no process can make a new writable shared mapping, write(2) it or reopen it for
        /// writing through /proc. The kernel then also refuses to punch holes in it
        /// (`release` fails with EPERM): its memory is never given back, so it must be sized
        /// to what the tenant may hold.
        case clientsRead
    }

    /// Creates a memfd named `name` (visible in /proc/PID/fd as `memfd:NAME`; use
    /// `kvtier-arena-<tenant>`), sizes it to `capacity` without committing memory, seals its size
    /// and maps it. With `populate`, every page is committed now (MAP_POPULATE): writes to a
    /// fresh memfd page fault at ~0.9 GB/s, to a populated one they run at memory speed.
    /// - Throws: `Errno.invalidArgument` when `capacity` is not a positive multiple of
    ///   `alignment`, or when `name` holds a NUL or is longer than the kernel allows (249 bytes);
    ///   otherwise the failing call's error (`memfd_create`, `ftruncate`, `fcntl`, `mmap`).
    public init(name: String, capacity: Int, sharing: Sharing = .clientsWrite, populate: Bool = false) throws(Errno) {
        guard Self.isValidCapacity(capacity), !name.utf8.contains(0) else { throw .invalidArgument }
        let descriptor = try ArenaSystem.createMemoryFile(name: name)
        do throws(Errno) {
            try descriptor.truncate(to: capacity)
            switch sharing {
            case .clientsWrite:
                try ArenaSystem.addSeals(descriptor, ArenaSystem.sealShrink | ArenaSystem.sealGrow | ArenaSystem.sealSeal)
                self.base = try ArenaSystem.mapShared(descriptor, bytes: capacity, writable: true, populate: populate)
            case .clientsRead:
                try ArenaSystem.addSeals(descriptor, ArenaSystem.sealShrink | ArenaSystem.sealGrow)
                // Mapped before the write seal: the seal keeps existing writable mappings (ours).
                let base = try ArenaSystem.mapShared(descriptor, bytes: capacity, writable: true, populate: populate)
                do throws(Errno) {
                    try ArenaSystem.addSeals(descriptor, ArenaSystem.sealFutureWrite | ArenaSystem.sealSeal)
                } catch {
                    ArenaSystem.unmap(base, bytes: capacity)
                    throw error
                }
                self.base = base
            }
        } catch {
            descriptor.closeIgnoringErrors()
            throw error
        }
        self.fileDescriptor = descriptor
        self.capacity = capacity
        self.systemPageBytes = ArenaSystem.pageBytes()
    }

    private init(base: UnsafeMutableRawPointer, descriptor: FileDescriptor, capacity: Int) {
        self.base = base
        self.fileDescriptor = descriptor
        self.capacity = capacity
        self.systemPageBytes = ArenaSystem.pageBytes()
    }

    /// Maps an arena received from the daemon. `descriptor` stays the caller's: the arena keeps
    /// its own duplicate (close-on-exec) and closes that.
    ///
    /// Never trusts the peer: the descriptor must be a regular file (a memfd) at least `capacity`
    /// bytes long, and sealed against shrinking so it cannot be cut short under the mapping.
    /// `.clientsRead` maps it read-only and also insists on F_SEAL_FUTURE_WRITE, so bytes read
    /// from it are bytes no other client can change (writing through such a mapping faults).
    /// - Throws: `Errno.invalidArgument` when `capacity` is not a positive multiple of
    ///   `alignment`, the descriptor is not a regular file, or it is shorter than `capacity`;
    ///   `Errno.notPermitted` when it lacks a seal it needs; otherwise the failing call's error
    ///   (`EBADF` for a closed descriptor).
    public static func map(descriptor: Int32, capacity: Int, sharing: Sharing = .clientsWrite) throws(Errno) -> SharedArena {
        guard isValidCapacity(capacity) else { throw .invalidArgument }
        let received = FileDescriptor(rawValue: descriptor)
        let status = try received.status()
        guard status.st_mode & S_IFMT == S_IFREG, Int(status.st_size) >= capacity else { throw .invalidArgument }
        let seals: Int32
        do throws(Errno) {
            seals = try ArenaSystem.seals(received)
        } catch where error == .invalidArgument {
            throw .notPermitted  // A file that cannot be sealed (not a memfd).
        }
        guard seals & ArenaSystem.sealShrink != 0 else { throw .notPermitted }
        if sharing == .clientsRead, seals & ArenaSystem.sealFutureWrite == 0 { throw .notPermitted }
        let owned = try received.duplicateCloseOnExec()
        do throws(Errno) {
            let base = try ArenaSystem.mapShared(owned, bytes: capacity, writable: sharing == .clientsWrite, populate: false)
            return SharedArena(base: base, descriptor: owned, capacity: capacity)
        } catch {
            owned.closeIgnoringErrors()
            throw error
        }
    }

    /// The seals of an arena's descriptor (F_GET_SEALS), for tests and diagnostics.
    public var seals: Int32 { (try? ArenaSystem.seals(fileDescriptor)) ?? 0 }

    private static func isValidCapacity(_ capacity: Int) -> Bool {
        capacity > 0 && capacity % alignment == 0
    }

    /// Whether `extent` lies inside the arena and is aligned: check every extent a peer names
    /// with this before handing it to `withBytes` or `release`.
    public func contains(_ extent: Extent) -> Bool {
        extent.offset >= 0 && extent.length >= 0 && extent.offset <= capacity
            && extent.length <= capacity - extent.offset
            && extent.offset % Self.alignment == 0 && extent.length % Self.alignment == 0
    }

    /// Lends the bytes of `extent`. Other processes that map the arena may read and write them
    /// concurrently; who may touch which extent is the caller's protocol.
    /// - Precondition: `extent` lies inside the arena (a bug of ours otherwise; peer-supplied
    ///   extents are checked with `contains` first).
    public func withBytes<R, E: Error>(
        _ extent: Extent,
        _ body: (UnsafeMutableRawBufferPointer) throws(E) -> R
    ) throws(E) -> R {
        precondition(
            extent.offset >= 0 && extent.length >= 0 && extent.offset <= capacity
                && extent.length <= capacity - extent.offset,
            "extent outside the arena"
        )
        return try body(UnsafeMutableRawBufferPointer(start: base + extent.offset, count: extent.length))
    }

    /// Gives the memory of `extent` back to the kernel; it reads as zeros afterwards, in every
    /// mapping. Uses `madvise(MADV_REMOVE)`, which punches a hole in the memfd like
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)` (MADV_DONTNEED would only drop this process's page
    /// table entries and free nothing). Where the system page is larger than `alignment`, the
    /// partial pages at either end are zeroed instead, which frees nothing.
    ///
    /// Touching the extent again commits memory again, reads included: a read fault on a hole of
    /// a shared memfd mapping allocates a zeroed page.
    /// - Precondition: `contains(extent)`.
    public func release(_ extent: Extent) throws(Errno) {
        precondition(contains(extent), "extent outside the arena or not aligned")
        let page = systemPageBytes
        let first = (extent.offset + page - 1) / page * page
        let last = extent.end / page * page
        guard first < last else {
            memset(base + extent.offset, 0, extent.length)
            return
        }
        memset(base + extent.offset, 0, first - extent.offset)
        memset(base + last, 0, extent.end - last)
        try ArenaSystem.removePages(base + first, bytes: last - first)
    }

    /// Commits the memory of `extent` and maps it writable in this process without changing its
    /// bytes (`madvise(MADV_POPULATE_WRITE)`, Linux 5.14), so later writes find it faulted in: a
    /// first write to a fresh memfd page costs a fault and a zeroing (~1 GB/s on these hosts,
    /// against ~10 GB/s to committed memory). Safe while other threads write the extent.
    /// Throws EINVAL where the kernel lacks it, EFAULT/ENOMEM when memory runs out.
    /// - Precondition: `contains(extent)`, and the arena is mapped writable here.
    public func populate(_ extent: Extent) throws(Errno) {
        precondition(contains(extent), "extent outside the arena or not aligned")
        guard extent.length > 0 else { return }
        try ArenaSystem.populateWritable(base + extent.offset, bytes: extent.length)
    }

    /// Memory committed to the arena, in bytes: `st_blocks` × 512 of the memfd, which shmem keeps
    /// as pages allocated × page size. Counts pages touched by any process mapping it.
    public func residentBytes() throws(Errno) -> Int {
        Int(try fileDescriptor.status().st_blocks) * 512
    }

    /// Unmaps and closes, reporting the error that `deinit` would swallow.
    public consuming func close() throws(Errno) {
        let base = self.base
        let descriptor = self.fileDescriptor
        let capacity = self.capacity
        discard self
        ArenaSystem.unmap(base, bytes: capacity)
        try descriptor.closeReportingErrors()
    }

    deinit {
        ArenaSystem.unmap(base, bytes: capacity)
        fileDescriptor.closeIgnoringErrors()
    }
}

/// The memfd and mapping calls of `SharedArena`. memfd_create, its flags and the seal commands
/// sit behind _GNU_SOURCE, which Swift's Glibc module does not define, so their Linux ABI values
/// are spelled out here.
enum ArenaSystem {
    static let memfdCloseOnExec: UInt32 = 0x1  // MFD_CLOEXEC
    static let memfdAllowSealing: UInt32 = 0x2  // MFD_ALLOW_SEALING
    static let addSealsCommand: Int32 = 1024 + 9  // F_ADD_SEALS
    static let getSealsCommand: Int32 = 1024 + 10  // F_GET_SEALS
    static let sealSeal: Int32 = 0x1  // F_SEAL_SEAL
    static let sealShrink: Int32 = 0x2  // F_SEAL_SHRINK
    static let sealGrow: Int32 = 0x4  // F_SEAL_GROW
    static let sealFutureWrite: Int32 = 0x10  // F_SEAL_FUTURE_WRITE (Linux 5.1)
    static let mapPopulate: Int32 = 0x8000  // MAP_POPULATE

    private typealias MemfdCreate = @convention(c) (UnsafePointer<CChar>, UInt32) -> Int32

    /// memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING), looked up in libc at run time
    /// (glibc 2.27+); ENOSYS where libc lacks it.
    static func createMemoryFile(name: String) throws(Errno) -> FileDescriptor {
        guard let create = SystemCall.libcFunction("memfd_create", as: MemfdCreate.self) else { throw .noFunction }
        return FileDescriptor(rawValue: try SystemCall.retryingInterrupts {
            name.withCString { create($0, memfdCloseOnExec | memfdAllowSealing) }
        })
    }

    static func addSeals(_ descriptor: FileDescriptor, _ seals: Int32) throws(Errno) {
        _ = try SystemCall.retryingInterrupts { fcntl(descriptor.rawValue, addSealsCommand, seals) }
    }

    static func seals(_ descriptor: FileDescriptor) throws(Errno) -> Int32 {
        try SystemCall.retryingInterrupts { fcntl(descriptor.rawValue, getSealsCommand) }
    }

    static func mapShared(_ descriptor: FileDescriptor, bytes: Int, writable: Bool, populate: Bool) throws(Errno) -> UnsafeMutableRawPointer {
        let protection = writable ? PROT_READ | PROT_WRITE : PROT_READ
        let address = mmap(nil, bytes, protection, MAP_SHARED | (populate ? mapPopulate : 0), descriptor.rawValue, 0)
        guard let address, address != MAP_FAILED else { throw Errno(rawValue: errno) }
        return address
    }

    /// Unmaps a mapping this process made; failure would mean a wrong address, a bug.
    static func unmap(_ address: UnsafeMutableRawPointer, bytes: Int) {
        let status = munmap(address, bytes)
        assert(status == 0, "munmap of an arena failed")
    }

    /// madvise(MADV_REMOVE): frees the pages of a shared mapping and the file behind them.
    static func removePages(_ address: UnsafeMutableRawPointer, bytes: Int) throws(Errno) {
        _ = try SystemCall.retryingInterrupts { madvise(address, bytes, MADV_REMOVE) }
    }

    /// madvise(MADV_POPULATE_WRITE): faults pages in writable, preserving their contents.
    static func populateWritable(_ address: UnsafeMutableRawPointer, bytes: Int) throws(Errno) {
        _ = try SystemCall.retryingInterrupts { madvise(address, bytes, populateWriteAdvice) }
    }

    static let populateWriteAdvice: Int32 = 23  // MADV_POPULATE_WRITE (Linux 5.14)

    static func pageBytes() -> Int { Int(getpagesize()) }
}
