import CKVTierKernels
import KVTierCore
import Testing

@Suite struct ChecksumTests {
    @Test func crc32cMatchesTheStandardCheckValue() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([]) == 0)
    }

    /// The hardware path and the table path agree on every length and alignment, and chunked
    /// checksums equal whole ones.
    @Test func hardwareAndTableAgree() {
        var random = SplitMix64(seed: 0xC4C)
        let data = (0..<5000).map { _ in UInt8(truncatingIfNeeded: random.next()) }
        data.withUnsafeBytes { all in
            for start in [0, 1, 3, 7] {
                for length in [0, 1, 7, 8, 9, 63, 64, 65, 1000, 4093] {
                    let slice = UnsafeRawBufferPointer(rebasing: all[start..<start + length])
                    let fast = kvt_crc32c(0, slice.baseAddress, length)
                    let portable = kvt_crc32c_portable(0, slice.baseAddress, length)
                    #expect(fast == portable, "start \(start) length \(length)")
                    let split = length / 3
                    let chunked = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: slice[split...]),
                                                  continuing: CRC32C.checksum(UnsafeRawBufferPointer(rebasing: slice[..<split])))
                    #expect(chunked == fast)
                }
            }
        }
    }
}

@Suite struct ByteCodingTests {
    @Test func fieldsRoundTripLittleEndian() throws {
        var writer = ByteWriter()
        writer.u8(0xAB)
        writer.u16(0x1234)
        writer.u32(0xDEAD_BEEF)
        writer.u64(0x0102_0304_0506_0708)
        writer.key(PageKey(high: 1, low: 2))
        #expect(Array(writer.bytes[1..<3]) == [0x34, 0x12])
        try writer.bytes.withUnsafeBytes { raw throws in
            var reader = ByteReader(raw)
            #expect(try reader.u8() == 0xAB)
            #expect(try reader.u16() == 0x1234)
            #expect(try reader.u32() == 0xDEAD_BEEF)
            #expect(try reader.u64() == 0x0102_0304_0506_0708)
            #expect(try reader.key() == PageKey(high: 1, low: 2))
            #expect(reader.remaining == 0)
            #expect(throws: ByteReader.OutOfBounds.self) { try reader.u8() }
        }
    }

    @Test func readingPastTheEndThrowsInsteadOfReading() throws {
        let bytes: [UInt8] = [1, 2, 3]
        bytes.withUnsafeBytes { raw in
            var reader = ByteReader(raw)
            #expect(throws: ByteReader.OutOfBounds(offset: 0, wanted: 4, available: 3)) { try reader.u32() }
            #expect(throws: ByteReader.OutOfBounds.self) { try reader.bytes(-1) }
            #expect(throws: ByteReader.OutOfBounds.self) { try reader.skip(Int.max) }
        }
    }
}
