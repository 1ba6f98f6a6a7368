@preconcurrency import Glibc
import KVTierClient
import KVTierCore
import KVTierTools
import Testing

@Suite struct SessionArchiveTests {
    static func archive(tokens: Int = 37) -> SessionArchive {
        let model = ModelSpecification(name: "m", layers: 2, kvHeads: 2, headDim: 8, elementType: .bfloat16, pageTokens: 16, ropeTheta: 500_000)
        var random = SplitMix64(seed: 3)
        let elements = model.shape.elements(tokens: tokens)
        return SessionArchive(modelID: 0xFEED, model: model, name: "chat ✓", ttlSeconds: 60, pinned: true,
                              tokens: (0..<tokens).map { _ in UInt32(truncatingIfNeeded: random.next()) },
                              keys: (0..<elements).map { _ in UInt16(truncatingIfNeeded: random.next()) },
                              values: (0..<elements).map { _ in UInt16(truncatingIfNeeded: random.next()) })
    }

    @Test func roundTripsThroughAFile() throws {
        let original = Self.archive()
        let path = "/tmp/kvtier-archive-test-\(getpid()).kvts"
        defer { unlink(path) }
        try original.write(to: path)
        #expect(try SessionArchive.read(from: path) == original)
    }

    @Test func everyFlippedBitAndEveryCutIsRefused() throws {
        let bytes = try Self.archive(tokens: 5).encoded()
        for offset in stride(from: 0, to: bytes.count, by: 3) {
            var damaged = bytes
            damaged[offset] ^= 0x10
            #expect(throws: SessionArchive.ArchiveError.self, "bit flip at \(offset)") { try SessionArchive(decoding: damaged) }
        }
        for cut in stride(from: 0, to: bytes.count, by: 5) {
            #expect(throws: SessionArchive.ArchiveError.self, "cut at \(cut)") { try SessionArchive(decoding: Array(bytes[0..<cut])) }
        }
    }

    @Test func kvOfTheWrongSizeIsNotWritten() {
        var archive = Self.archive()
        archive.keys.removeLast()
        #expect(throws: SessionArchive.ArchiveError.self) { try archive.encoded() }
    }
}
