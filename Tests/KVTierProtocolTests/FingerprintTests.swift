import KVTierCore
@testable import KVTierProtocol
import Testing

@Suite struct FingerprintTests {
    /// From Python:
    /// `int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")` where `data` is
    /// `b"kvtier-model-v1\0" + struct.pack("<H", len(name)) + name + struct.pack("<HHHBBHf", ...)`.
    @Test func matchesPythonHashlib() throws {
        let llama = try ModelFingerprint.hashedBytes(name: "llama-3.1-8b", layers: 32, kvHeads: 8, headDim: 128,
                                                     elementType: .bfloat16, pageTokens: 256, ropeTheta: 500_000)
        #expect(hex(llama) == "6b76746965722d6d6f64656c2d7631000c006c6c616d612d332e312d3862200008008000020000010024f448")
        #expect(try ModelFingerprint.modelID(name: "llama-3.1-8b", layers: 32, kvHeads: 8, headDim: 128,
                                             elementType: .bfloat16, pageTokens: 256, ropeTheta: 500_000) == 0xFA50_1839_2055_E287)
        #expect(try ModelFingerprint.modelID(name: "qwen2-7b", layers: 28, kvHeads: 4, headDim: 128,
                                             elementType: .float16, pageTokens: 16, ropeTheta: 1_000_000) == 0xBE72_7598_CBC1_829A)
        #expect(try ModelFingerprint.modelID(name: "", layers: 1, kvHeads: 1, headDim: 1,
                                             elementType: .float16, pageTokens: 1, ropeTheta: 0) == 0xB3B4_CE1D_E56D_9A9A)
    }

    @Test func theIdUsesThePageSizeInForceAndEveryShapeField() throws {
        let request = RegisterModel(name: "m", layers: 2, kvHeads: 2, headDim: 64, elementType: .float16, pageTokens: 0, ropeTheta: 10_000)
        let id = try request.modelID(pageTokensInForce: 256)
        var explicit = request
        explicit.pageTokens = 256
        #expect(try explicit.modelID(pageTokensInForce: 256) == id, "the id does not depend on how pageTokens was asked for")
        #expect(try request.modelID(pageTokensInForce: 128) != id)
        var other = request
        other.elementType = .bfloat16
        #expect(try other.modelID(pageTokensInForce: 256) != id)
        other = request
        other.ropeTheta = 10_001
        #expect(try other.modelID(pageTokensInForce: 256) != id)
        other = request
        other.name = "n"
        #expect(try other.modelID(pageTokensInForce: 256) != id)
    }

    /// A disk codec is hashed as a trailing `string` (docs/protocol.md's second vector; from
    /// Python as above, with `struct.pack("<H", len(codec)) + codec` appended); without one, or
    /// with an empty one, the bytes and the id are exactly those of before the field existed.
    @Test func aDiskCodecIsHashedAsATrailingStringAndOnlyThen() throws {
        let old = "6b76746965722d6d6f64656c2d7631000c006c6c616d612d332e312d3862200008008000020000010024f448"
        func bytes(_ codec: String?) throws -> String {
            hex(try ModelFingerprint.hashedBytes(name: "llama-3.1-8b", layers: 32, kvHeads: 8, headDim: 128,
                                                 elementType: .bfloat16, pageTokens: 256, ropeTheta: 500_000, diskCodec: codec))
        }
        func id(_ codec: String?) throws -> UInt64 {
            try RegisterModel(name: "llama-3.1-8b", layers: 32, kvHeads: 8, headDim: 128, elementType: .bfloat16,
                              pageTokens: 0, ropeTheta: 500_000, diskCodec: codec).modelID(pageTokensInForce: 256)
        }
        #expect(try bytes(nil) == old && bytes("") == old)
        #expect(try id(nil) == 0xFA50_1839_2055_E287 && id("") == 0xFA50_1839_2055_E287, "old clients' ids never change")
        #expect(try bytes("fp16") == old + "040066703136")
        #expect(try id("fp16") == 0x891F_60FD_58F9_A27B)
        #expect(try id("fp16+zstd") == 0xB1E9_226D_4DE8_3DF9)
        #expect(try id("tq3m+zstd(3)") == 0x1F27_6863_F5B8_C7A7)
        #expect(try id("fp16+zstd(1)") != id("fp16+zstd"), "the protocol hashes what it is given: canonical names are the daemon's job")
    }

    private func hex(_ bytes: [UInt8]) -> String {
        bytes.map { String($0 >> 4, radix: 16) + String($0 & 15, radix: 16) }.joined()
    }
}
