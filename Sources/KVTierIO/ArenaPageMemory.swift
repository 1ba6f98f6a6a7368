import KVTierStore
import Logging
import Synchronization
import SystemPackage

/// `PageMemory` over a `SharedArena`: a tenant's RAM-tier pages live in a sealed memfd that its
/// clients map, so `GET` hands out offsets and `PUT` adopts what clients wrote.
public final class ArenaPageMemory: PageMemory, @unchecked Sendable {
    // Invariant: `arena` is immutable after init and unmapped only in deinit, after every
    // borrowing PageBuffer (which retains self) is gone; `allocator` is used under its mutex.
    private let arena: SharedArena
    private let allocator: Mutex<ExtentAllocator>
    private let logger: Logger

    /// Creates the memfd (`name` shows in /proc/PID/fd) and maps it; `capacity` is virtual:
    /// memory is committed only as pages are written.
    public init(name: String, capacity: Int, logger: Logger) throws(Errno) {
        let rounded = (capacity + ExtentAllocator.granuleBytes - 1) / ExtentAllocator.granuleBytes * ExtentAllocator.granuleBytes
        arena = try SharedArena(name: name, capacity: rounded)
        allocator = Mutex(ExtentAllocator(capacity: rounded))
        self.logger = logger
    }

    public var capacity: Int { arena.capacity }
    public var allocatedBytes: Int { allocator.withLock { $0.allocatedBytes } }
    public var shareableDescriptor: Int32? { arena.descriptor }

    public func allocate(_ bytes: Int) -> Extent? { allocator.withLock { $0.allocate(bytes) } }

    public func isAllocated(_ extent: Extent) -> Bool {
        arena.contains(extent) && allocator.withLock { $0.isAllocated(extent) }
    }

    public func free(_ extent: Extent) {
        do { try arena.release(extent) } catch {
            // The extent is still reusable; only its memory was not returned to the kernel.
            logger.warning("could not return arena memory to the kernel", metadata: ["extent": "\(extent)", "errno": "\(error)"])
        }
        let outcome = allocator.withLock { allocator in Result { () throws(ExtentAllocator.Error) in try allocator.free(extent) } }
        if case .failure(let error) = outcome {
            preconditionFailure("freeing an extent the RAM tier does not own: \(error)")
        }
    }

    public func buffer(_ extent: Extent) -> PageBuffer {
        arena.withBytes(extent) { PageBuffer(borrowing: $0, owner: self) }
    }

    /// Memory committed to the arena right now.
    public func residentBytes() -> Int { (try? arena.residentBytes()) ?? 0 }
}
