import KVTierCore
import KVTierTools
import Testing

@Suite struct NumPyArrayTests {
    @Test func writesWhatItReads() throws {
        let array = NumPyArray(shape: [3, 2, 4], elements: (0..<24).map { UInt16($0 * 977 & 0xFFFF) })
        let bytes = array.npyBytes()
        #expect((bytes.count - 24 * 2) % 64 == 0, "header must pad to 64 bytes as NumPy does")
        #expect(try NumPyArray(npy: bytes) == array)
    }

    @Test func readsVersionTwoHeaders() throws {
        let header = "{'descr': '<f2', 'fortran_order': False, 'shape': (2,), }".padding(to: 52) + "\n"
        var bytes: [UInt8] = [0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59, 2, 0]
        bytes += [UInt8(header.utf8.count), 0, 0, 0] + Array(header.utf8) + [0x00, 0x3C, 0x00, 0xC0]
        let array = try NumPyArray(npy: bytes)
        #expect(array.shape == [2])
        #expect(array.elements == [0x3C00, 0xC000])
    }

    @Test func rejectsWrongInputWithClearErrors() {
        let good = NumPyArray(shape: [2, 2], elements: [1, 2, 3, 4]).npyBytes()
        #expect(throws: NumPyArray.ParseError.notNumPy) { try NumPyArray(npy: Array("hello world".utf8)) }
        #expect(throws: NumPyArray.ParseError.sizeMismatch(expected: 8, actual: 6)) { try NumPyArray(npy: Array(good.dropLast(2))) }
        var version = good
        version[6] = 9
        #expect(throws: NumPyArray.ParseError.unsupportedVersion(9)) { try NumPyArray(npy: version) }
        let f4 = replacing(good, "<f2", "<f4")
        #expect(throws: NumPyArray.ParseError.unsupportedDType("<f4")) { try NumPyArray(npy: f4) }
        let fortran = replacing(good, "False", "True ")
        #expect(throws: NumPyArray.ParseError.fortranOrder) { try NumPyArray(npy: fortran) }
    }

    /// Random bytes and random damage to a valid file never crash the parser.
    @Test func survivesGarbage() {
        var random = SplitMix64(seed: 0xF00D)
        let good = NumPyArray(shape: [4, 2, 8], elements: (0..<64).map { UInt16($0) }).npyBytes()
        for _ in 0..<2000 {
            var bytes = good
            for _ in 0..<Int(random.next() % 6) {
                bytes[Int(random.next() % UInt64(bytes.count))] = UInt8(truncatingIfNeeded: random.next())
            }
            bytes = Array(bytes.prefix(Int(random.next() % UInt64(bytes.count + 1))))
            _ = try? NumPyArray(npy: bytes)
        }
    }

    private func replacing(_ bytes: [UInt8], _ old: String, _ new: String) -> [UInt8] {
        let text = Array(old.utf8), replacement = Array(new.utf8)
        var out = bytes
        for i in 0...(bytes.count - text.count) where Array(bytes[i..<i + text.count]) == text {
            out.replaceSubrange(i..<i + text.count, with: replacement)
            break
        }
        return out
    }
}

extension String {
    fileprivate func padding(to length: Int) -> String { self + String(repeating: " ", count: max(0, length - count)) }
}
