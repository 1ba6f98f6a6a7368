import KVTierCore

/// Hands out extents of `[0, capacity)` in 4096-byte granules, for the RAM tier's arena.
///
/// Policy: best fit. KV pages come in a few sizes per model and codec, so a
/// freed page usually leaves a hole of exactly the size the next page needs; best fit reuses that
/// hole and leaves long runs whole for large pages, where first fit would nibble the first long
/// run it meets. It is also cheaper here: the size index finds the best run by binary search,
/// while first fit would walk runs by address.
///
/// Cost: free runs are kept in hash maps by start and by end granule (O(1) coalescing) and in
/// buckets by length, with a sorted array of the distinct lengths. Runs are disjoint, so there
/// are at most about sqrt(2 * granules) distinct lengths (about 5,800 for 64 GiB): `allocate`
/// and `free` cost O(1) hash operations plus a binary search, and a short memmove only when a
/// length appears or disappears. Live extents cost one hash entry each.
///
/// Not thread-safe: the caller serializes access.
public struct ExtentAllocator: Sendable {
    /// Size and alignment of every extent: the page size of the arena's protocol.
    public static let granuleBytes = Extent.granuleBytes

    public enum Error: Swift.Error, Hashable, CustomStringConvertible {
        /// The extent is not one this allocator handed out and has not freed since: a double
        /// free, an extent of another arena, or a different length than was allocated.
        case notAllocated(Extent)

        public var description: String {
            switch self {
            case .notAllocated(let extent):
                return "extent \(extent) is not allocated: free each extent exactly once, "
                    + "with the offset and length `allocate` returned"
            }
        }
    }

    /// Bytes managed: `[0, capacity)`.
    public let capacity: Int
    /// Bytes in live extents (each rounded up to whole granules).
    public private(set) var allocatedBytes = 0
    /// Bytes not in any live extent.
    public var freeBytes: Int { capacity - allocatedBytes }
    /// Length of the longest free run: the largest allocation that can succeed now.
    public var largestFreeRun: Int { (sortedLengths.last ?? 0) * Self.granuleBytes }
    /// Number of live extents.
    public var liveExtentCount: Int { allocated.count }

    // All of the following count granules, not bytes.
    private struct FreeRun {
        var length: Int
        /// Position of the run's start in `startsByLength[length]`.
        var slot: Int
    }
    private var freeByStart: [Int: FreeRun] = [:]
    /// End (exclusive) of each free run → its start.
    private var freeStartByEnd: [Int: Int] = [:]
    /// Starts of the free runs of each length; never empty (empty buckets are removed).
    private var startsByLength: [Int: [Int]] = [:]
    /// The keys of `startsByLength`, ascending.
    private var sortedLengths: [Int] = []
    /// Start → length of each live extent.
    private var allocated: [Int: Int] = [:]

    /// An allocator with everything free.
    /// - Precondition: `capacity` is a non-negative multiple of `granuleBytes` (the daemon
    ///   validates the configured arena size before it gets here).
    public init(capacity: Int) {
        precondition(
            capacity >= 0 && capacity % Self.granuleBytes == 0,
            "arena capacity must be a non-negative multiple of \(Self.granuleBytes)"
        )
        self.capacity = capacity
        if capacity > 0 { insertFree(start: 0, length: capacity / Self.granuleBytes) }
    }

    /// An extent of at least `bytes` (rounded up to whole granules), or nil when `bytes` is not
    /// positive or no free run is long enough. Never traps on any `bytes`.
    public mutating func allocate(_ bytes: Int) -> Extent? {
        guard bytes > 0, bytes <= capacity else { return nil }
        let granules = (bytes - 1) / Self.granuleBytes + 1
        let index = firstLengthIndex(atLeast: granules)
        guard index < sortedLengths.count else { return nil }
        let length = sortedLengths[index]
        // Last of the bucket: O(1) to remove, and the most recently freed run of that length.
        let start = startsByLength[length]!.last!
        removeFree(start: start)
        if length > granules { insertFree(start: start + granules, length: length - granules) }
        allocated[start] = granules
        allocatedBytes += granules * Self.granuleBytes
        return Extent(offset: start * Self.granuleBytes, length: granules * Self.granuleBytes)
    }

    /// Returns `extent` to the free space, merged with free neighbours on both sides.
    ///
    /// Freeing an extent that is not live is a bug in the caller: debug builds trap on it;
    /// release builds throw `Error.notAllocated` and leave the allocator unchanged.
    public mutating func free(_ extent: Extent) throws(Error) {
        guard isAllocated(extent) else {
            assertionFailure("\(Error.notAllocated(extent))")
            throw Error.notAllocated(extent)
        }
        var start = extent.offset / Self.granuleBytes
        var end = extent.end / Self.granuleBytes
        allocated.removeValue(forKey: start)
        allocatedBytes -= extent.length
        if let previous = freeStartByEnd[start] {
            removeFree(start: previous)
            start = previous
        }
        if let next = freeByStart[end] {
            removeFree(start: end)
            end += next.length
        }
        insertFree(start: start, length: end - start)
    }

    /// Whether `extent` is live, exactly as `allocate` returned it.
    public func isAllocated(_ extent: Extent) -> Bool {
        let granule = Self.granuleBytes
        guard extent.offset >= 0, extent.length > 0,
            extent.offset % granule == 0, extent.length % granule == 0,
            let length = allocated[extent.offset / granule]
        else { return false }
        return length == extent.length / granule
    }

    /// The free runs in address order. O(n log n): for diagnostics and tests, not hot paths.
    public var freeExtents: [Extent] {
        freeByStart
            .map { Extent(offset: $0.key * Self.granuleBytes, length: $0.value.length * Self.granuleBytes) }
            .sorted { $0.offset < $1.offset }
    }

    // MARK: Free-run index

    /// Index in `sortedLengths` of the first length >= `granules` (count when none).
    private func firstLengthIndex(atLeast granules: Int) -> Int {
        var low = 0
        var high = sortedLengths.count
        while low < high {
            let middle = (low + high) / 2
            if sortedLengths[middle] < granules { low = middle + 1 } else { high = middle }
        }
        return low
    }

    private mutating func insertFree(start: Int, length: Int) {
        let slot: Int
        if startsByLength[length] != nil {
            slot = startsByLength[length]!.count
            startsByLength[length]!.append(start)
        } else {
            slot = 0
            startsByLength[length] = [start]
            sortedLengths.insert(length, at: firstLengthIndex(atLeast: length))
        }
        freeByStart[start] = FreeRun(length: length, slot: slot)
        freeStartByEnd[start + length] = start
    }

    private mutating func removeFree(start: Int) {
        let run = freeByStart.removeValue(forKey: start)!
        freeStartByEnd.removeValue(forKey: start + run.length)
        let bucketCount = startsByLength[run.length]!.count
        if bucketCount == 1 {
            startsByLength.removeValue(forKey: run.length)
            sortedLengths.remove(at: firstLengthIndex(atLeast: run.length))
            return
        }
        // Swap-remove: move the bucket's last start into the vacated slot.
        let moved = startsByLength[run.length]!.removeLast()
        if moved != start {
            startsByLength[run.length]![run.slot] = moved
            freeByStart[moved]!.slot = run.slot
        }
    }
}
