/// Page-aligned memory owned by one holder at a time: the destination of disk reads (O_DIRECT
/// needs the alignment) and the home of decoded pages.
public final class PageBuffer: @unchecked Sendable {
    // Invariant: exactly one task uses the memory at a time; ownership moves with the reference.
    // A borrowed buffer's memory belongs to `owner`, which this buffer keeps alive.
    public let bytes: UnsafeMutableRawBufferPointer
    private let owner: (any AnyObject & Sendable)?

    public static let alignment = 4096

    /// Zero-filled memory.
    public init(byteCount: Int) {
        bytes = .allocate(byteCount: max(byteCount, 1), alignment: Self.alignment)
        bytes.initializeMemory(as: UInt8.self, repeating: 0)
        owner = nil
    }

    /// A view of memory that `owner` owns (an extent of a shared arena): reads decode straight
    /// into it; nothing is freed when the view goes away.
    public init(borrowing bytes: UnsafeMutableRawBufferPointer, owner: any AnyObject & Sendable) {
        self.bytes = bytes
        self.owner = owner
    }

    /// Memory the caller will overwrite completely before reading it (read destinations, decode
    /// outputs): skips the zero fill, which costs as much as a copy on large pages.
    public init(overwrittenByteCount byteCount: Int) {
        bytes = .allocate(byteCount: max(byteCount, 1), alignment: Self.alignment)
        owner = nil
    }

    deinit { if owner == nil { bytes.deallocate() } }

    public var count: Int { bytes.count }

    public var readOnly: UnsafeRawBufferPointer { UnsafeRawBufferPointer(bytes) }

    public func copyBytes() -> [UInt8] { Array(readOnly) }
}
