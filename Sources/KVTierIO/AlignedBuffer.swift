@preconcurrency import Glibc
import SystemPackage

/// Page-aligned memory owned by exactly one holder, for O_DIRECT reads.
///
/// The capacity is rounded up to a multiple of `IOLimits.directIOAlignment`, so a record whose
/// length is rounded up for O_DIRECT still fits. The memory is lent through closures; a read hands
/// it to a `BlockReader` with `read(from:offset:length:using:)` or, for batches that fill many
/// slices of one buffer, by building `ReadRequest`s inside `withUnsafeMutableBytes`.
// Invariant for @unchecked Sendable: the buffer is non-copyable, so its memory has one owner at a
// time and moving it to another task moves the only access path with it.
public struct AlignedBuffer: ~Copyable, @unchecked Sendable {
    /// Alignment of the address and capacity of every buffer.
    public static var alignment: Int { IOLimits.directIOAlignment }

    private let base: UnsafeMutableRawPointer
    /// Usable bytes: the requested capacity rounded up to `alignment` (at least one page).
    public let capacity: Int

    /// Allocates `capacity` bytes (rounded up) aligned to `alignment`, zero-filled.
    /// - Throws: `Errno.invalidArgument` for a negative capacity, `Errno.noMemory` when the
    ///   allocation fails.
    public init(capacity requested: Int) throws(Errno) {
        guard requested >= 0, requested <= Int.max - Self.alignment else { throw Errno.invalidArgument }
        let rounded = max(Self.alignment, (requested + Self.alignment - 1) / Self.alignment * Self.alignment)
        var memory: UnsafeMutableRawPointer?
        let status = posix_memalign(&memory, Self.alignment, rounded)
        guard status == 0, let memory else { throw Errno(rawValue: status == 0 ? ENOMEM : status) }
        memset(memory, 0, rounded)
        self.base = memory
        self.capacity = rounded
    }

    deinit { free(base) }

    /// Lends the memory for reading.
    public func withUnsafeBytes<R, E: Error>(
        _ body: (UnsafeRawBufferPointer) throws(E) -> R
    ) throws(E) -> R {
        try body(UnsafeRawBufferPointer(start: base, count: capacity))
    }

    /// Lends the memory for writing.
    public mutating func withUnsafeMutableBytes<R, E: Error>(
        _ body: (UnsafeMutableRawBufferPointer) throws(E) -> R
    ) throws(E) -> R {
        try body(UnsafeMutableRawBufferPointer(start: base, count: capacity))
    }

    /// Lends the memory across suspension points, for a batch of reads into slices of it:
    /// the pointer stays valid until `body` returns, and nobody else can reach the buffer meanwhile.
    public mutating func withUnsafeMutableBytes<R, E: Error>(
        isolation: isolated (any Actor)? = #isolation,
        _ body: (UnsafeMutableRawBufferPointer) async throws(E) -> R
    ) async throws(E) -> R {
        try await body(UnsafeMutableRawBufferPointer(start: base, count: capacity))
    }

    /// Reads `length` bytes at `offset` of `file` into the start of this buffer.
    ///
    /// - Returns: the bytes read (fewer than `length` only at end of file) or the read's error.
    public mutating func read(
        isolation: isolated (any Actor)? = #isolation,
        from file: borrowing SegmentFile,
        offset: Int64,
        length: Int,
        using reader: any BlockReader
    ) async -> Result<Int, ReadError> {
        let request = file.readRequest(
            offset: offset,
            length: length,
            into: UnsafeMutableRawBufferPointer(start: base, count: capacity),
            tag: 0
        )
        let completions = await reader.read([request])
        return completions.first?.result ?? .failure(.readerClosed)
    }
}
