/// Page-aligned memory owned by one holder at a time: the destination of disk reads (O_DIRECT
/// needs the alignment) and the home of decoded pages.
public final class PageBuffer: @unchecked Sendable {
    // Invariant: exactly one task uses the memory at a time; ownership moves with the reference.
    public let bytes: UnsafeMutableRawBufferPointer

    public static let alignment = 4096

    /// Zero-filled memory.
    public init(byteCount: Int) {
        bytes = .allocate(byteCount: max(byteCount, 1), alignment: Self.alignment)
        bytes.initializeMemory(as: UInt8.self, repeating: 0)
    }

    /// Memory the caller will overwrite completely before reading it (read destinations, decode
    /// outputs): skips the zero fill, which costs as much as a copy on large pages.
    public init(overwrittenByteCount byteCount: Int) {
        bytes = .allocate(byteCount: max(byteCount, 1), alignment: Self.alignment)
    }

    deinit { bytes.deallocate() }

    public var count: Int { bytes.count }

    public var readOnly: UnsafeRawBufferPointer { UnsafeRawBufferPointer(bytes) }

    public func copyBytes() -> [UInt8] { Array(readOnly) }
}
