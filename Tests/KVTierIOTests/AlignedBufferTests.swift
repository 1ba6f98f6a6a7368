import SystemPackage
import Testing
@testable import KVTierIO

@Suite("Aligned buffers")
struct AlignedBufferTests {
    @Test("capacity is rounded up to whole pages and the address is page-aligned", arguments: [0, 1, 4095, 4096, 4097, 1 << 20])
    func alignment(requested: Int) throws {
        var buffer = try AlignedBuffer(capacity: requested)
        let expected = max(4096, (requested + 4095) / 4096 * 4096)
        #expect(buffer.capacity == expected)
        buffer.withUnsafeMutableBytes { raw in
            #expect(raw.count == expected)
            #expect(Int(bitPattern: raw.baseAddress) % AlignedBuffer.alignment == 0)
            #expect(raw.allSatisfy { $0 == 0 })
            raw[raw.count - 1] = 0xAB
        }
        buffer.withUnsafeBytes { raw in #expect(raw[raw.count - 1] == 0xAB) }
    }

    @Test("a negative capacity is an error, not a crash")
    func negativeCapacity() {
        #expect(throws: Errno.invalidArgument) { _ = try AlignedBuffer(capacity: -1) }
    }
}
