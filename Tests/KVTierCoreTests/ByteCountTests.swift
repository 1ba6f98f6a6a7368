import KVTierCore
import Testing

@Suite struct ByteCountTests {
    @Test(arguments: [
        ("64MiB", 64 << 20), ("8GiB", 8 << 30), ("512KiB", 512 << 10), ("1000", 1000), ("1.5GiB", 3 << 29),
        ("2MB", 2_000_000), ("0", 0), (" 16 MiB ", 16 << 20), ("1TiB", 1 << 40),
    ])
    func parses(text: String, bytes: Int) {
        #expect(ByteCount(parsing: text)?.bytes == bytes)
    }

    @Test(arguments: ["", "MiB", "-1", "12XB", "1.2.3MiB", "99999999999999999999GiB", "nan", "inf"])
    func rejects(text: String) {
        #expect(ByteCount(parsing: text) == nil)
    }

    @Test func printsLargestWholeUnit() {
        #expect(ByteCount.mebibytes(64).description == "64MiB")
        #expect(ByteCount(1536).description == "1.50KiB")
        #expect(ByteCount(12).description == "12B")
    }

    @Test func elementConversionRoundTrips() {
        for type in ElementType.allCases {
            for value: Float in [0, 1, -2.5, 1e-3, 300] {
                let back = type.float(fromBits: type.bits(from: value))
                #expect(abs(back - value) <= abs(value) / 256, "\(type) \(value) came back as \(back)")
            }
            #expect(type.isNonFinite(bits: type.bits(from: .infinity)))
            #expect(type.isNonFinite(bits: type.bits(from: .nan)))
            #expect(!type.isNonFinite(bits: type.bits(from: 65000)))
        }
        // bfloat16 rounds to nearest even: 1 + 2^-8 is a tie between 1 and 1 + 2^-7.
        #expect(ElementType.bfloat16.bits(from: 1 + 1.0 / 256) == 0x3F80)
        #expect(ElementType.bfloat16.bits(from: 1 + 3.0 / 256) == 0x3F82)
    }
}
