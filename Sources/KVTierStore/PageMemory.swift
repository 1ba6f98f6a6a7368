/// Where the RAM tier keeps a tenant's pages: a fixed range of memory handed out in extents.
/// `KVTierIO.ArenaPageMemory` is the real one (a sealed memfd the tenant's clients map too).
public protocol PageMemory: AnyObject, Sendable {
    /// Bytes the memory can hold.
    var capacity: Int { get }
    /// Bytes in live extents.
    var allocatedBytes: Int { get }
    /// A fresh extent of at least `bytes` (rounded up to 4096), or nil when none is free.
    func allocate(_ bytes: Int) -> Extent?
    /// Returns an extent from `allocate` and gives its memory back to the system.
    func free(_ extent: Extent)
    /// Whether `extent` is live right now (checks extents a client names).
    func isAllocated(_ extent: Extent) -> Bool
    /// The memory of a live extent, valid while the returned buffer lives.
    func buffer(_ extent: Extent) -> PageBuffer
    /// The descriptor clients map (nil when the memory cannot be shared).
    var shareableDescriptor: Int32? { get }
}
