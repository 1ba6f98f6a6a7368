import KVTierCore

/// Where the RAM tier keeps a tenant's pages, and where the tenant's clients stage the pages they
/// put. `KVTierIO.ArenaPageMemory` is the real one: two sealed memfds the tenant's clients map.
///
/// Two regions, because pages served to every process of a tenant must live in memory no client
/// can write (docs/security.md): the *page* region holds stored pages and clients may only
/// read it; the *staging* region is client-writable and holds nothing but what a client is about
/// to PUT, which the store copies into the page region.
public protocol PageMemory: AnyObject, Sendable {
    /// Bytes the page region can hold.
    var capacity: Int { get }
    /// Bytes in live page extents.
    var allocatedBytes: Int { get }
    /// A fresh page extent of at least `bytes` (rounded up to 4096), or nil when none is free.
    func allocate(_ bytes: Int) -> Extent?
    /// Returns an extent from `allocate` for reuse.
    func free(_ extent: Extent)
    /// Whether `extent` is a live page extent right now.
    func isAllocated(_ extent: Extent) -> Bool
    /// The memory of a live page extent, valid while the returned buffer lives.
    func buffer(_ extent: Extent) -> PageBuffer
    /// The page region's descriptor, which clients map read-only (nil when it cannot be shared).
    var shareableDescriptor: Int32? { get }

    /// Bytes the staging region can hold: the tenant's staging limit.
    var stagingCapacity: Int { get }
    /// A fresh staging extent of at least `bytes` (rounded up to 4096), or nil when none is free.
    func allocateStaging(_ bytes: Int) -> Extent?
    /// Returns an extent from `allocateStaging` for reuse.
    func freeStaging(_ extent: Extent)
    /// The memory of a live staging extent (clients may write it at any time: copy, never keep).
    func stagingBuffer(_ extent: Extent) -> PageBuffer
    /// The staging region's descriptor, which clients map read-write (nil when not shared).
    var stagingDescriptor: Int32? { get }
}
