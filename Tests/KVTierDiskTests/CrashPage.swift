#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import KVTierCodec
import KVTierCore
import KVTierStore

/// A page of the crash tests: address, shape and bytes follow from its number alone.
///
/// Must stay identical to `CrashPage` in Sources/kvtier/DebugCommands.swift, which the
/// `kvtier debug crash-writer` child process uses (a test target cannot import an executable).
/// `crashPageMatchesTheWriter` in ProcessCrashTests guards the pair.
struct CrashPage {
    static let tenant = TenantID(0xC4A5)
    static let keyHigh: UInt64 = 0xC4A5_C4A5
    static let modelID: UInt64 = 0xC4A5

    let number: UInt64

    init(number: UInt64) { self.number = number }

    init?(address: PageAddress) {
        guard address.tenant == Self.tenant, address.key.high == Self.keyHigh else { return nil }
        number = address.key.low
    }

    var address: PageAddress { PageAddress(tenant: Self.tenant, key: PageKey(high: Self.keyHigh, low: number)) }

    /// 1–4 layers of 16–512 tokens × 1 head × 32.
    var shape: PageShape {
        let h = Self.mix(number)
        return PageShape(tokens: 16 + Int(h % 497), layers: 1 + Int((h >> 16) % 4), kvHeads: 1, headDim: 32)
    }

    /// Finite float16 values (no NaN or infinity) that vary with the number.
    var data: PageBuffer {
        let buffer = PageBuffer(byteCount: shape.rawBytes)
        var state = number &* 0x9E37_79B9_7F4A_7C15 | 1
        let elements = buffer.bytes.bindMemory(to: UInt16.self)
        for i in 0..<elements.count {
            state ^= state << 13
            state ^= state >> 7
            state ^= state << 17
            // Exponents 0x0C..0x13 (|x| roughly 1e-4 ... 16).
            elements[i] = UInt16(truncatingIfNeeded: state) & 0x83FF | UInt16(0x3000 + (state >> 32) % 8 * 0x400)
        }
        return buffer
    }

    static func mix(_ value: UInt64) -> UInt64 {
        var z = value &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// What a read of a crash page gave, judged against the page's expected shape and bytes.
enum PageCheck: Equatable, CustomStringConvertible {
    case exact
    case missing(DiskMiss)
    /// The read succeeded with other bytes or another shape: the one outcome a store may never produce.
    case wrongBytes(String)

    var description: String {
        switch self {
        case .exact: "exact"
        case .missing(let miss): "miss (\(miss))"
        case .wrongBytes(let why): "WRONG BYTES: \(why)"
        }
    }

    init(_ result: Result<DiskPage, DiskMiss>, expected page: CrashPage) {
        switch result {
        case .failure(let miss):
            self = .missing(miss)
        case .success(let got):
            if got.page.shape != page.shape {
                self = .wrongBytes("shape \(got.page.shape), expected \(page.shape)")
            } else if got.data.count < page.shape.rawBytes {
                self = .wrongBytes("\(got.data.count) bytes, expected \(page.shape.rawBytes)")
            } else {
                let expected = page.data
                // memcmp: a generic comparison is unspecialized in debug builds and far too slow.
                let same = memcmp(got.data.readOnly.baseAddress!, expected.readOnly.baseAddress!, page.shape.rawBytes) == 0
                self = same ? .exact : .wrongBytes("contents differ from page \(page.number)")
            }
        }
    }
}

extension DiskTier {
    /// Writes a crash page with a lossless codec.
    @discardableResult
    func write(_ page: CrashPage, codec: Codec = Codec(.fp16, .zstd(level: 1))) async throws(DiskTierError) -> StoredPage {
        try await write(page.address, modelID: CrashPage.modelID, codec: codec, shape: page.shape, data: page.data)
    }

    /// Reads pages in one batch and judges each.
    func check(_ pages: [CrashPage]) async -> [PageCheck] {
        let results = await read(pages.map(\.address))
        return zip(results, pages).map { PageCheck($0, expected: $1) }
    }
}
