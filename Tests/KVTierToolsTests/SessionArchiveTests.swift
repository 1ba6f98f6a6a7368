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

    /// The model's disk codec rides in the archive (header flag bit 0, a string after
    /// ropeTheta); an archive of a model without one is as version 1 always wrote it.
    @Test func aDiskCodecIsKeptAndOnlyThenFlagged() throws {
        let plain = try Self.archive(tokens: 3).encoded()
        #expect(plain[12..<16] == [0, 0, 0, 0], "no flags without a codec")
        var coded = Self.archive(tokens: 3)
        coded.model.diskCodec = "tq3m+zstd(3)"
        let bytes = try coded.encoded()
        #expect(bytes[12..<16] == [1, 0, 0, 0])
        #expect(try SessionArchive(decoding: bytes) == coded)
        // The codec string sits right after ropeTheta: header 16, modelID 8, name "m" 3, shape 14.
        let after = 16 + 8 + 3 + 14
        #expect(Array(bytes[after..<after + 14]) == [12, 0] + Array("tq3m+zstd(3)".utf8))
        #expect(bytes.count == plain.count + 14)
        var unknown = bytes
        unknown[12] = 2  // a flag this version does not know: refused before the checksum is looked at
        #expect(throws: SessionArchive.ArchiveError.invalid("flags set that this version does not know")) { try SessionArchive(decoding: unknown) }
    }

    @Test func kvOfTheWrongSizeIsNotWritten() {
        var archive = Self.archive()
        archive.keys.removeLast()
        #expect(throws: SessionArchive.ArchiveError.self) { try archive.encoded() }
    }
}
