import CKVTierKernels

/// CRC-32C (Castagnoli), the checksum of page records, index blocks and the manifest.
/// Hardware-accelerated where the CPU has SSE4.2. "123456789" → 0xE3069283.
public enum CRC32C {
    public static func checksum(_ bytes: UnsafeRawBufferPointer, continuing crc: UInt32 = 0) -> UInt32 {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return crc }
        return kvt_crc32c(crc, base, bytes.count)
    }

    public static func checksum(_ bytes: [UInt8], continuing crc: UInt32 = 0) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0, continuing: crc) }
    }
}
