import Synchronization

/// Reuses large read buffers. Fresh multi-megabyte allocations come straight from the kernel,
/// which faults and zeroes every page on first touch: measured at a third of restore time before
/// this pool existed. Buffers are kept by size class (eight per doubling, so at most 12.5 %
/// is wasted and equal-sized records reuse each other's buffers) up to a byte limit.
public final class PageBufferPool: Sendable {
    private let free = Mutex<[Int: [PageBuffer]]>([:])
    private let retained = Mutex(0)
    public let limitBytes: Int

    public init(limitBytes: Int) {
        self.limitBytes = limitBytes
    }

    static func sizeClass(_ bytes: Int) -> Int {
        var power = 64 << 10
        while power < bytes { power <<= 1 }
        guard power > 64 << 10 else { return power }
        let step = power / 16  // eight classes between power/2 and power
        return (bytes + step - 1) / step * step
    }

    /// A buffer of at least `bytes` bytes, contents undefined.
    public func take(_ bytes: Int) -> PageBuffer {
        let size = Self.sizeClass(bytes)
        if let buffer = free.withLock({ $0[size]?.popLast() }) {
            retained.withLock { $0 -= size }
            return buffer
        }
        return PageBuffer(overwrittenByteCount: size)
    }

    /// Returns a buffer obtained from `take`; dropped instead when the pool is full.
    public func give(_ buffer: PageBuffer) {
        let size = buffer.count
        guard size == Self.sizeClass(size) else { return }
        let kept = retained.withLock { total -> Bool in
            guard total + size <= limitBytes else { return false }
            total += size
            return true
        }
        if kept { free.withLock { $0[size, default: []].append(buffer) } }
    }
}
