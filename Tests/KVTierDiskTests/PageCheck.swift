#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import KVTierCodec
import KVTierCore
import KVTierStore
import KVTierTools


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

    init(_ result: Result<DiskPage, DiskMiss>, expected page: CrashTestPage) {
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
    func write(_ page: CrashTestPage, codec: Codec = Codec(.fp16, .zstd(level: 1))) async throws(DiskTierError) -> StoredPage {
        try await write(page.address, modelID: CrashTestPage.modelID, codec: codec, shape: page.shape, data: page.data)
    }

    /// Reads pages in one batch and judges each.
    func check(_ pages: [CrashTestPage]) async -> [PageCheck] {
        let results = await read(pages.map(\.address))
        return zip(results, pages).map { PageCheck($0, expected: $1) }
    }
}
