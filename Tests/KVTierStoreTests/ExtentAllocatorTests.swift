#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import KVTierCore
import KVTierStore
import Testing

private let granule = ExtentAllocator.granuleBytes

/// The reference model: one flag per granule, and the maximal free runs read off it.
private struct GranuleBitmap {
    var used: [Bool]

    init(granules: Int) { used = Array(repeating: false, count: granules) }

    var usedBytes: Int { used.count(where: { $0 }) * granule }

    var freeRuns: [Extent] {
        var runs: [Extent] = []
        var start: Int?
        for index in 0...used.count {
            let free = index < used.count && !used[index]
            if free, start == nil { start = index }
            if !free, let runStart = start {
                runs.append(Extent(offset: runStart * granule, length: (index - runStart) * granule))
                start = nil
            }
        }
        return runs
    }

    mutating func mark(_ extent: Extent, used value: Bool) {
        for index in extent.offset / granule..<extent.end / granule {
            precondition(used[index] != value, "model: granule \(index) already \(value ? "used" : "free")")
            used[index] = value
        }
    }
}

/// A seed from `KVTIER_TEST_SEED` when set, otherwise random; printed so a failure replays.
private func testSeed(_ name: String) -> UInt64 {
    let seed: UInt64
    if let text = getenv("KVTIER_TEST_SEED").map({ String(cString: $0) }), let parsed = UInt64(text) {
        seed = parsed
    } else {
        seed = UInt64.random(in: 0...UInt64.max)
    }
    print("\(name): seed \(seed) (rerun with KVTIER_TEST_SEED=\(seed))")
    return seed
}

/// Fills `allocator` with one-granule extents until it is full.
private func fillWithGranules(_ allocator: inout ExtentAllocator) -> [Extent] {
    var extents: [Extent] = []
    while let extent = allocator.allocate(1) { extents.append(extent) }
    return extents
}

/// `allocator.allocate(bytes)`, failing the test when it returns nil.
private func allocate(
    _ bytes: Int, from allocator: inout ExtentAllocator, sourceLocation: SourceLocation = #_sourceLocation
) throws -> Extent {
    let extent = allocator.allocate(bytes)
    return try #require(extent, "allocate(\(bytes)) returned nil", sourceLocation: sourceLocation)
}

@Suite struct ExtentAllocatorTests {
    @Test func randomSequencesMatchTheBitmapModel() throws {
        let seed = testSeed("randomSequencesMatchTheBitmapModel")
        var random = SplitMix64(seed: seed)
        for round in 0..<8 {
            let granules = Int.random(in: 1...512, using: &random)
            var allocator = ExtentAllocator(capacity: granules * granule)
            var model = GranuleBitmap(granules: granules)
            var live: [Extent] = []
            let context = "seed \(seed) round \(round) capacity \(granules) granules"
            for step in 0..<3000 {
                if live.isEmpty || random.chance(0.55) {
                    // Mostly small, sometimes up to the whole arena, rarely not a granule multiple.
                    let maxGranules = random.chance(0.9) ? min(8, granules) : granules
                    let bytes = Int.random(in: 1...maxGranules * granule, using: &random)
                    let needed = (bytes + granule - 1) / granule * granule
                    let candidates = model.freeRuns.filter { $0.length >= needed }
                    let got = allocator.allocate(bytes)
                    guard let bestLength = candidates.map(\.length).min() else {
                        #expect(got == nil, "\(context) step \(step): \(bytes) bytes fit nowhere")
                        continue
                    }
                    let extent = try #require(got, "\(context) step \(step): \(bytes) bytes should fit")
                    #expect(extent.length == needed)
                    // Best fit: placed at the start of a shortest run that is long enough.
                    #expect(
                        candidates.contains { $0.offset == extent.offset && $0.length == bestLength },
                        "\(context) step \(step): \(extent) is not a best fit among \(candidates)"
                    )
                    model.mark(extent, used: true)
                    live.append(extent)
                } else {
                    let extent = live.remove(at: Int.random(in: 0..<live.count, using: &random))
                    try allocator.free(extent)
                    model.mark(extent, used: false)
                    #expect(!allocator.isAllocated(extent))
                }
                #expect(allocator.allocatedBytes == model.usedBytes, "\(context) step \(step)")
                #expect(allocator.freeBytes == allocator.capacity - model.usedBytes)
                #expect(allocator.liveExtentCount == live.count)
                let runs = model.freeRuns
                #expect(allocator.largestFreeRun == (runs.map(\.length).max() ?? 0), "\(context) step \(step)")
                #expect(allocator.freeExtents == runs, "\(context) step \(step): runs not coalesced")
            }
            live.shuffle(using: &random)
            for extent in live { try allocator.free(extent) }
            #expect(allocator.allocatedBytes == 0)
            #expect(allocator.freeExtents == [Extent(offset: 0, length: granules * granule)], "\(context)")
        }
    }

    @Test func fragmentationLeavesNoLargeRunUntilNeighboursAreFreed() throws {
        var allocator = ExtentAllocator(capacity: 64 * granule)
        let extents = fillWithGranules(&allocator)
        #expect(extents.count == 64)
        for (index, extent) in extents.enumerated() where index % 2 == 0 { try allocator.free(extent) }
        #expect(allocator.freeBytes == 32 * granule)
        #expect(allocator.largestFreeRun == granule)
        #expect(allocator.allocate(granule + 1) == nil, "half the arena is free, but only in single granules")
        #expect(allocator.freeExtents.count == 32)

        for (index, extent) in extents.enumerated() where index % 2 == 1 { try allocator.free(extent) }
        #expect(allocator.freeExtents == [Extent(offset: 0, length: 64 * granule)])
        #expect(allocator.allocate(64 * granule) == Extent(offset: 0, length: 64 * granule))
    }

    @Test func bestFitTakesTheExactHoleAndKeepsTheLongRun() throws {
        var allocator = ExtentAllocator(capacity: 16 * granule)
        let a = try allocate(3 * granule, from: &allocator)  // [0, 3)
        let b = try allocate(granule, from: &allocator)  // [3, 4)
        let c = try allocate(granule, from: &allocator)  // [4, 5)
        _ = try allocate(granule, from: &allocator)  // [5, 6); [6, 16) stays free
        try allocator.free(a)
        try allocator.free(c)
        // Free runs: 3 granules at 0, 1 at 4, 10 at 6. First fit would take granule 0.
        #expect(allocator.allocate(granule) == c)
        #expect(allocator.allocate(2 * granule) == Extent(offset: 0, length: 2 * granule))
        #expect(allocator.largestFreeRun == 10 * granule)
        #expect(allocator.isAllocated(b))
    }

    @Test func capacityEdges() throws {
        var empty = ExtentAllocator(capacity: 0)
        #expect(empty.allocate(1) == nil)
        #expect(empty.largestFreeRun == 0 && empty.freeBytes == 0 && empty.freeExtents.isEmpty)

        var one = ExtentAllocator(capacity: granule)
        let only = try allocate(1, from: &one)
        #expect(only == Extent(offset: 0, length: granule))
        #expect(one.allocate(1) == nil)
        #expect(one.freeBytes == 0 && one.largestFreeRun == 0)
        try one.free(only)
        #expect(one.allocate(granule) == only)

        let capacity = 1 << 30
        var whole = ExtentAllocator(capacity: capacity)
        for bytes in [0, -1, -granule, Int.min, capacity + 1, Int.max] {
            #expect(whole.allocate(bytes) == nil, "allocate(\(bytes))")
        }
        let all = try allocate(capacity, from: &whole)
        #expect(all == Extent(offset: 0, length: capacity))
        #expect(whole.allocate(1) == nil)
        try whole.free(all)
        #expect(whole.freeExtents == [all])
    }

    @Test func hundredThousandLiveExtents() throws {
        let seed = testSeed("hundredThousandLiveExtents")
        var random = SplitMix64(seed: seed)
        let count = 100_000
        var allocator = ExtentAllocator(capacity: 4 * count * granule)
        let clock = ContinuousClock()
        let started = clock.now
        var live: [Extent] = []
        live.reserveCapacity(count)
        for _ in 0..<count {
            live.append(try allocate(Int.random(in: 1...4 * granule, using: &random), from: &allocator))
        }
        // Churn: free a random half, allocate it back in other sizes, then free everything.
        for _ in 0..<2 {
            live.shuffle(using: &random)
            for extent in live[(count / 2)...] { try allocator.free(extent) }
            live.removeLast(count - count / 2)
            while live.count < count, let extent = allocator.allocate(Int.random(in: 1...4, using: &random) * granule) {
                live.append(extent)
            }
        }
        #expect(allocator.liveExtentCount == live.count)
        #expect(allocator.allocatedBytes == live.reduce(0) { $0 + $1.length })
        live.shuffle(using: &random)
        for extent in live { try allocator.free(extent) }
        print("hundredThousandLiveExtents: \(clock.now - started) (seed \(seed))")
        #expect(allocator.freeExtents == [Extent(offset: 0, length: allocator.capacity)])
    }

    @Test func misuseIsRejectedWithoutChangingState() async throws {
        #if DEBUG
        // Debug builds trap so the bug is found where it happens.
        await #expect(processExitsWith: .failure) {
            var allocator = ExtentAllocator(capacity: 8 * 4096)
            let extent = allocator.allocate(4096)!
            try? allocator.free(extent)
            try? allocator.free(extent)
        }
        #else
        var allocator = ExtentAllocator(capacity: 8 * granule)
        let extent = try allocate(2 * granule, from: &allocator)
        let misuses = [
            Extent(offset: extent.offset, length: granule),  // wrong length
            Extent(offset: 2 * granule, length: granule),  // never allocated
            Extent(offset: 1, length: granule),  // unaligned
            Extent(offset: -granule, length: granule),
        ]
        for misuse in misuses {
            #expect(throws: ExtentAllocator.Error.notAllocated(misuse)) { try allocator.free(misuse) }
        }
        try allocator.free(extent)
        #expect(throws: ExtentAllocator.Error.notAllocated(extent)) { try allocator.free(extent) }
        #expect(allocator.freeExtents == [Extent(offset: 0, length: 8 * granule)])
        #expect(allocator.allocatedBytes == 0)
        #endif
    }
}
