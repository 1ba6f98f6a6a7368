/// A byte range of a tenant's arena. Extents handed out by `ExtentAllocator` start and end on
/// multiples of `Extent.granuleBytes` (docs/protocol.md, "Shared memory").
public struct Extent: Hashable, Sendable, CustomStringConvertible {
    /// Byte offset from the start of the arena.
    public var offset: Int
    /// Length in bytes.
    public var length: Int

    public init(offset: Int, length: Int) {
        self.offset = offset
        self.length = length
    }

    /// The first byte after the extent.
    public var end: Int { offset + length }

    public var description: String { "[\(offset), +\(length))" }
}

extension Extent {
    /// Size and alignment of the extents of a tenant's arena, and of the arena itself: the page
    /// size of the protocol's shared memory (docs/protocol.md, "Shared memory").
    public static let granuleBytes = 4096
}
