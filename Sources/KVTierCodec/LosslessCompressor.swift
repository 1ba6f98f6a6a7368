import CLZ4
import CZstd

/// LZ4 and Zstandard behind one interface, with the contexts they need kept for reuse.
/// Not thread-safe: one per `SectionCodec`.
final class LosslessCompressor {
    private var zstdCompress: OpaquePointer?
    private var zstdDecompress: OpaquePointer?

    init() {}

    deinit {
        if let zstdCompress { ZSTD_freeCCtx(zstdCompress) }
        if let zstdDecompress { ZSTD_freeDCtx(zstdDecompress) }
    }

    /// Worst-case compressed size of `count` bytes.
    static func bound(_ stage: LosslessStage, _ count: Int) -> Int {
        switch stage {
        case .none: count
        case .lz4: Int(LZ4_compressBound(Int32(count)))
        case .zstd: ZSTD_compressBound(count)
        }
    }

    /// Compresses `source` into `destination` and returns the bytes written, or nil when the
    /// result would not be smaller than the input (the caller then stores it raw).
    func compress(
        _ stage: LosslessStage, _ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer
    ) throws(CodecError) -> Int? {
        switch stage {
        case .none:
            return nil
        case .lz4:
            let written = LZ4_compress_default(
                source.baseAddress!.assumingMemoryBound(to: CChar.self),
                destination.baseAddress!.assumingMemoryBound(to: CChar.self),
                Int32(source.count), Int32(min(destination.count, source.count - 1)))
            return written > 0 ? Int(written) : nil
        case .zstd(let level):
            if zstdCompress == nil { zstdCompress = ZSTD_createCCtx() }
            guard let context = zstdCompress else { throw .compressionFailed("ZSTD_createCCtx returned NULL (out of memory)") }
            let written = ZSTD_compressCCtx(
                context, destination.baseAddress, destination.count, source.baseAddress, source.count, Int32(level))
            if ZSTD_isError(written) != 0 {
                let reason = String(cString: ZSTD_getErrorName(written))
                // A too-small destination only means the data did not shrink.
                if ZSTD_getErrorCode(written) == ZSTD_error_dstSize_tooSmall { return nil }
                throw .compressionFailed("zstd: \(reason)")
            }
            return written < source.count ? written : nil
        }
    }

    /// Decompresses `source` into exactly `destination.count` bytes; anything else is corruption.
    func decompress(
        _ stage: LosslessStage, _ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer
    ) throws(CodecError) {
        switch stage {
        case .none:
            throw .corrupt("frame says compressed but the codec has no lossless stage")
        case .lz4:
            guard source.count <= Int(Int32.max), destination.count <= Int(Int32.max) else {
                throw .corrupt("lz4 frame larger than 2 GiB")
            }
            let produced = LZ4_decompress_safe(
                source.baseAddress!.assumingMemoryBound(to: CChar.self),
                destination.baseAddress!.assumingMemoryBound(to: CChar.self),
                Int32(source.count), Int32(destination.count))
            guard produced == Int32(destination.count) else {
                throw .corrupt(produced < 0 ? "lz4 stream is malformed" : "lz4 stream decodes to \(produced) bytes, expected \(destination.count)")
            }
        case .zstd:
            if zstdDecompress == nil { zstdDecompress = ZSTD_createDCtx() }
            guard let context = zstdDecompress else { throw .compressionFailed("ZSTD_createDCtx returned NULL (out of memory)") }
            let produced = ZSTD_decompressDCtx(
                context, destination.baseAddress, destination.count, source.baseAddress, source.count)
            if ZSTD_isError(produced) != 0 {
                throw .corrupt("zstd stream is malformed: \(String(cString: ZSTD_getErrorName(produced)))")
            }
            guard produced == destination.count else {
                throw .corrupt("zstd stream decodes to \(produced) bytes, expected \(destination.count)")
            }
        }
    }
}
