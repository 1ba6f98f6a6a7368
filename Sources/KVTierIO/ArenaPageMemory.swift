import Dispatch
import KVTierCore
import KVTierStore
import KVTierSystem
import Logging
import Synchronization
import SystemPackage

/// `PageMemory` over two `SharedArena`s per tenant: the page arena (sealed F_SEAL_FUTURE_WRITE,
/// clients map it read-only, so `GET` hands out offsets of bytes no client can change) and the
/// staging arena (clients write pages there for `PUT`, which copies them into the page arena).
///
/// Neither arena gives memory back to the system: the page arena cannot (the write seal makes
/// the kernel refuse hole punching), and the staging arena keeps what clients wrote once so later
/// writes to reused extents hit committed memory (a fresh memfd page faults at ~0.9 GB/s). Both
/// are therefore sized to bounds: the page arena to the tenant's RAM quota plus fragmentation
/// slack, the staging arena to the staging limit.
public final class ArenaPageMemory: PageMemory, @unchecked Sendable {
    // Invariant: the arenas are immutable after init and unmapped only in deinit, after every
    // borrowing PageBuffer (which retains self) is gone; each allocator is used under its mutex.
    private let pages: SharedArena
    private let staging: SharedArena
    private let pageAllocator: Mutex<ExtentAllocator>
    private let stagingAllocator: Mutex<ExtentAllocator>
    /// The page arena below `committedEnd` is faulted in; `running` while a background commit
    /// extends it (`commitAhead`).
    private let committed = Mutex<(committedEnd: Int, running: Bool, failed: Bool)>((0, false, false))
    private let logger: Logger

    /// Creates both memfds (`name` and `name-staging` show in /proc/PID/fd) and maps them. The
    /// page arena's `capacity` is virtual (committed as pages are stored); so is the staging
    /// arena's unless `populateStaging` commits it now. The default is lazy: a tenant that
    /// connects and never stages costs the daemon no memory (every local uid can connect).
    public init(name: String, capacity: Int, stagingCapacity: Int, populateStaging: Bool = false, logger: Logger) throws(Errno) {
        pages = try SharedArena(name: name, capacity: Self.rounded(capacity), sharing: .clientsRead)
        staging = try SharedArena(name: "\(name)-staging", capacity: Self.rounded(stagingCapacity), sharing: .clientsWrite,
                                  populate: populateStaging)
        pageAllocator = Mutex(ExtentAllocator(capacity: pages.capacity))
        stagingAllocator = Mutex(ExtentAllocator(capacity: staging.capacity))
        self.logger = logger
    }

    /// How far past the end of the highest page extent handed out the page arena is committed
    /// in the background (`SharedArena.populate`), so that puts copy into memory already faulted
    /// in instead of faulting a fresh page every 4 KiB on the request path. Best fit allocates
    /// fresh memory from the low end of the arena's trailing free run, so the used part grows
    /// upwards and this keeps ahead of it. It commits ahead by as much as is in use up to this
    /// limit, so a tenant never makes the daemon commit more than twice what it stores (and the
    /// arena, sized to the tenant's quota, bounds both).
    public static let commitAheadBytes = 64 << 20
    /// Bytes committed per madvise call, so the range grows in steps puts can use at once.
    static let commitStepBytes = 8 << 20

    private static func rounded(_ bytes: Int) -> Int {
        let granule = ExtentAllocator.granuleBytes
        return max(granule, (bytes + granule - 1) / granule * granule)
    }

    public var capacity: Int { pages.capacity }
    public var allocatedBytes: Int { pageAllocator.withLock { $0.allocatedBytes } }
    public var shareableDescriptor: Int32? { pages.descriptor }

    public func allocate(_ bytes: Int) -> Extent? {
        guard let extent = pageAllocator.withLock({ $0.allocate(bytes) }) else { return nil }
        commitAhead(of: extent.end)
        return extent
    }

    /// Starts committing the page arena up to `commitAheadBytes` past `end` on a background
    /// queue, unless that is done or under way. Where the kernel lacks MADV_POPULATE_WRITE, pages
    /// fault in on first write as before (logged once).
    private func commitAhead(of end: Int) {
        // Ahead by as much as is in use, up to the limit: a tenant that stores little commits
        // little more (docs/security.md bounds what a tenant makes the daemon commit).
        let target = min(pages.capacity, end + min(Self.commitAheadBytes, end))
        let start = committed.withLock { c -> Bool in
            guard !c.running, !c.failed, c.committedEnd < target else { return false }
            c.running = true
            return true
        }
        guard start else { return }
        DispatchQueue.global(qos: .utility).async { [self] in
            while true {
                let (from, goal) = committed.withLock { ($0.committedEnd, target) }
                guard from < goal else { break }
                let step = Extent(offset: from, length: min(Self.commitStepBytes, goal - from))
                do throws(Errno) {
                    try pages.populate(step)
                } catch {
                    // EINVAL: the kernel lacks MADV_POPULATE_WRITE (before 5.14), for good. Anything
                    // else (memory short right now) stops this run only; the next allocation tries again.
                    if error == .invalidArgument {
                        logger.info("page arena memory is committed on first write (MADV_POPULATE_WRITE unavailable)", metadata: ["errno": "\(error)"])
                        committed.withLock { $0.failed = true }
                    }
                    break
                }
                committed.withLock { $0.committedEnd = step.end }
            }
            committed.withLock { $0.running = false }
        }
    }

    public func isAllocated(_ extent: Extent) -> Bool {
        pages.contains(extent) && pageAllocator.withLock { $0.isAllocated(extent) }
    }

    public func free(_ extent: Extent) { Self.release(extent, in: pageAllocator) }

    public func buffer(_ extent: Extent) -> PageBuffer {
        pages.withBytes(extent) { PageBuffer(borrowing: $0, owner: self) }
    }

    public var stagingCapacity: Int { staging.capacity }
    public var stagingDescriptor: Int32? { staging.descriptor }

    public func allocateStaging(_ bytes: Int) -> Extent? { stagingAllocator.withLock { $0.allocate(bytes) } }

    public func freeStaging(_ extent: Extent) { Self.release(extent, in: stagingAllocator) }

    public func stagingBuffer(_ extent: Extent) -> PageBuffer {
        staging.withBytes(extent) { PageBuffer(borrowing: $0, owner: self) }
    }

    private static func release(_ extent: Extent, in allocator: borrowing Mutex<ExtentAllocator>) {
        let outcome = allocator.withLock { allocator in Result { () throws(ExtentAllocator.Error) in try allocator.free(extent) } }
        if case .failure(let error) = outcome {
            preconditionFailure("freeing an extent the RAM tier does not own: \(error)")
        }
    }

    /// Memory committed to both arenas right now (pages touched by any process).
    public func residentBytes() -> Int { ((try? pages.residentBytes()) ?? 0) + ((try? staging.residentBytes()) ?? 0) }

    /// Seals of the page and staging arenas (for tests).
    public var seals: (pages: Int32, staging: Int32) { (pages.seals, staging.seals) }
}
