import KVTierClient
import KVTierCodec
import KVTierCore
import KVTierStore
import KVTierStoreTesting
import KVTierTools
import Testing

/// Fuzz of the readers of untrusted files: segment files through recovery and `kvtier verify`,
/// session archives through import. Seeded; every case prints its seed. The invariants: no
/// crash (a trap ends the test run), and nothing read back is ever other bytes than were written.
@Suite struct DiskFuzzTests {
    /// A store's files: pages 0..<pages written (some rewritten, some deleted) with small segments.
    static func baseline() async throws -> (files: [String: [UInt8]], deleted: Set<Int>, pages: Int) {
        let fixture = try await DiskStoreFixture.make(seed: 77, pages: 24, deleting: [3, 11, 19], segmentBytes: 64 << 10)
        return (try fixture.snapshot(), [3, 11, 19], 24)
    }

    static func storage(with files: [String: [UInt8]], seed: UInt64) throws -> SimulatedStorage {
        let storage = SimulatedStorage(seed: seed)
        try storage.makeDirectory("store")
        try storage.makeDirectory("store/quarantine")
        for (path, bytes) in files {
            let file = try storage.open(path, .readWriteCreate)
            try file.write(bytes, at: 0)
            try file.sync()
        }
        try storage.syncDirectory("store")
        return storage
    }

    /// One random kind of damage to one segment file: flips, a cut, garbage, or a record's
    /// blocks replayed elsewhere (at another offset, or appended).
    static func damage(_ bytes: inout [UInt8], _ random: inout SplitMix64) -> String {
        guard bytes.count > Block.size else { return "none" }
        func at(_ limit: Int) -> Int { Int(random.next() % UInt64(max(1, limit))) }
        switch random.next() % 4 {
        case 0:
            let flips = 1 + at(16)
            for _ in 0..<flips { bytes[at(bytes.count)] ^= UInt8(1 << at(8)) }
            return "flip×\(flips)"
        case 1:
            bytes.removeLast(at(bytes.count))
            return "cut"
        case 2:
            let start = at(bytes.count), length = min(bytes.count - start, 1 + at(3 * Block.size))
            for i in start..<start + length { bytes[i] = UInt8(truncatingIfNeeded: random.next()) }
            return "garbage"
        default:
            let blocks = bytes.count / Block.size
            let from = (1 + at(blocks - 1)) * Block.size, length = (1 + at(3)) * Block.size
            let chunk = Array(bytes[from..<min(bytes.count, from + length)])
            if random.next() % 2 == 0 {
                bytes += chunk
            } else {
                let to = (1 + at(blocks - 1)) * Block.size
                for (i, b) in chunk.enumerated() where to + i < bytes.count { bytes[to + i] = b }
            }
            return "replay"
        }
    }

    @Test(arguments: 0..<8)
    func damagedSegmentFilesNeverCrashOrServeWrongBytes(batch: Int) async throws {
        let (files, _, pages) = try await Self.baseline()
        let segments = files.keys.filter { $0.hasSuffix(".kvs") }.sorted()
        var served = 0, missed = 0
        for round in 0..<25 {
            let seed = UInt64(batch * 1000 + round)
            var random = SplitMix64(seed: seed)
            var mutated = files
            var applied: [String] = []
            for _ in 0..<(1 + Int(random.next() % 3)) {
                let victim = random.next() % 8 == 0 ? "store/MANIFEST" : segments[Int(random.next() % UInt64(segments.count))]
                applied.append("\(victim):\(Self.damage(&mutated[victim]!, &random))")
            }
            let storage = try Self.storage(with: mutated, seed: seed)
            _ = try DiskInspector(storage: storage, directory: "store").inspect()
            guard let tier = try? DiskTier(storage: storage, logger: diskTestLogger) else { continue }
            for n in 0..<pages {
                switch await tier.read(DiskStoreFixture.address(n)) {
                case .success(let page):
                    served += 1
                    #expect(page.data.copyBytes() == DiskStoreFixture.data(n).copyBytes(), "seed \(seed) \(applied): page \(n) wrong bytes")
                case .failure: missed += 1
                }
            }
            // The inspector, run again on what recovery left, must not crash either. After the
            // tier closed: its maintenance may still be moving a damaged segment to quarantine,
            // and an inspector listing the folder meanwhile finds the file gone.
            await tier.close()
            _ = try DiskInspector(storage: storage, directory: "store").inspect()
        }
        print("segment fuzz batch \(batch): 25 damaged stores, \(served) pages served byte-exact, \(missed) misses")
    }

    /// Boundary values (0, 1, 2^31±1, 2^32, 2^63±1, 2^64−1, …) written into every field position of
    /// an archive's header with the checksum made valid again: a reader that trusts a length or a
    /// shape before checking it crashes here.
    @Test func archiveHeaderFieldsAtBoundaryValuesNeverCrashTheReader() throws {
        let model = ModelSpecification(name: "m", layers: 2, kvHeads: 2, headDim: 8, elementType: .float16, pageTokens: 16, ropeTheta: 10_000)
        let elements = model.shape.elements(tokens: 3)
        let original = try SessionArchive(modelID: 7, model: model, name: "s", ttlSeconds: 1, pinned: false, tokens: [1, 2, 3],
                                          keys: (0..<elements).map { UInt16($0) }, values: (0..<elements).map { UInt16($0 * 3) }).encoded()
        let values: [UInt64] = [0, 1, 2, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 1 << 32,
                                0x7FFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0000, .max]
        var tried = 0, accepted = 0
        let headerEnd = original.count - 4 * elements - 4
        for offset in 0..<headerEnd {
            for width in [1, 2, 4, 8] where offset + width <= headerEnd {
                for value in values {
                    var bytes = original
                    for i in 0..<width { bytes[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
                    let crc = CRC32C.checksum(Array(bytes[0..<bytes.count - 4]))
                    for i in 0..<4 { bytes[bytes.count - 4 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
                    tried += 1
                    guard let decoded = try? SessionArchive(decoding: bytes) else { continue }
                    accepted += 1
                    // Whatever is accepted is exactly what the file says: nothing invented or lost.
                    #expect(try decoded.encoded() == bytes, "offset \(offset) width \(width) value \(value)")
                }
            }
        }
        print("archive fuzz: \(tried) boundary-value archives, \(accepted) accepted and byte-consistent, 0 crashes")
    }
}
