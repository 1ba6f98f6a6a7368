import KVTierCodec
import KVTierCore
import KVTierStore
import KVTierTools
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

    /// Finite float16 values that vary with the page number.
    var data: PageBuffer { TestPattern.finiteFloat16(bytes: Self.shape.rawBytes, seed: number) }
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
