import KVTierCodec
import KVTierCore
import KVTierStore
import Logging

let quietLogger: Logger = {
    var logger = Logger(label: "kvtier.test")
    logger.logLevel = .critical
    return logger
}()

/// A page whose contents follow from its number, so any read can be checked without keeping it.
struct TestPage {
    static let shape = PageShape(tokens: 16, layers: 2, kvHeads: 2, headDim: 32)
    static let tenant = TenantID(1000)

    let number: UInt64

    var address: PageAddress { PageAddress(tenant: Self.tenant, key: PageKey(high: 0xABCD, low: number)) }

    /// Finite float16 values (no NaN/Inf) that vary with the page number.
    var data: PageBuffer {
        let buffer = PageBuffer(byteCount: Self.shape.rawBytes)
        var state = number &* 0x9E37_79B9_7F4A_7C15 | 1
        let elements = buffer.bytes.bindMemory(to: UInt16.self)
        for i in 0..<elements.count {
            state ^= state << 13
            state ^= state >> 7
            state ^= state << 17
            // Exponents 0x0C..0x13 (|x| roughly 1e-4 ... 16): always finite.
            elements[i] = UInt16(truncatingIfNeeded: state) & 0x83FF | UInt16(0x3000 + (state >> 32) % 8 * 0x400)
        }
        return buffer
    }
}

func write(_ tier: DiskTier, _ page: TestPage, codec: Codec = Codec(.fp16, .zstd(level: 1))) async throws {
    try await tier.write(page.address, modelID: 7, codec: codec, shape: TestPage.shape, data: page.data)
}

/// Whether the tier returns exactly the page's bytes.
func readsBack(_ tier: DiskTier, _ page: TestPage) async -> Bool {
    guard case .success(let got) = await tier.read(page.address) else { return false }
    return got.data.copyBytes() == page.data.copyBytes()
}

func smallSegments() -> DiskTierConfiguration {
    var configuration = DiskTierConfiguration()
    configuration.segmentBytes = 64 << 10
    configuration.retryAfterFailureMicros = 0
    return configuration
}
