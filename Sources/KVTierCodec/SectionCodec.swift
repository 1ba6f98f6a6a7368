/// Encodes and decodes sections (the keys and values of one layer of one page) with one codec.
///
/// Holds scratch buffers and compression contexts, so keep one per thread and reuse it; it is
/// deliberately not `Sendable`. Layout of the bytes: docs/codec-layouts.md.
public final class SectionCodec {
    public let codec: Codec
    private let compressor = LosslessCompressor()
    private var scratch: UnsafeMutableRawBufferPointer = .init(start: nil, count: 0)

    /// Bytes of the frame that precedes a section when the codec has a lossless stage:
    /// `u32 storedBytes`, `u8 form` (0 raw, 1 compressed), three zero bytes.
    public static let frameHeaderBytes = 8

    public init(_ codec: Codec) {
        self.codec = codec
    }

    deinit {
        scratch.deallocate()
    }

    /// The largest encoding of a section of `shape`: size output buffers with it.
    public func maxEncodedSize(_ shape: SectionShape) -> Int {
        let quantized = codec.quantizer.sectionSize(shape)
        guard codec.lossless != .none else { return quantized }
        return Self.frameHeaderBytes + quantized
    }

    /// Encodes `keys` and `values` (16-bit elements, `shape.bytesPerPart` bytes each) into
    /// `output`, which needs `maxEncodedSize(shape)` bytes; returns the bytes written.
    public func encode(
        keys: UnsafeRawBufferPointer, values: UnsafeRawBufferPointer, shape: SectionShape,
        into output: UnsafeMutableRawBufferPointer
    ) throws(CodecError) -> Int {
        try codec.quantizer.check(shape)
        try Self.expect("keys", keys.count, shape.bytesPerPart)
        try Self.expect("values", values.count, shape.bytesPerPart)
        let needed = maxEncodedSize(shape)
        guard output.count >= needed else { throw .bufferSize(what: "output", expected: needed, actual: output.count) }

        let quantizedSize = codec.quantizer.sectionSize(shape)
        guard codec.lossless != .none else {
            try QuantizerKernels.encode(codec.quantizer, keys: keys, values: values, shape: shape,
                                        into: UnsafeMutableRawBufferPointer(rebasing: output[0..<quantizedSize]))
            return quantizedSize
        }

        // Quantize (and shuffle float data) into scratch, then compress into the frame body.
        let staging = reserveScratch(2 * quantizedSize)
        let quantized = UnsafeMutableRawBufferPointer(rebasing: staging[0..<quantizedSize])
        try QuantizerKernels.encode(codec.quantizer, keys: keys, values: values, shape: shape, into: quantized)
        var body = UnsafeRawBufferPointer(quantized)
        if codec.quantizer == .fp16 {
            let shuffled = UnsafeMutableRawBufferPointer(rebasing: staging[quantizedSize..<2 * quantizedSize])
            ByteShuffle.shuffle2(body, into: shuffled)
            body = UnsafeRawBufferPointer(shuffled)
        }
        let payload = UnsafeMutableRawBufferPointer(rebasing: output[Self.frameHeaderBytes..<needed])
        let compressed = try compressor.compress(codec.lossless, body, into: payload)
        let stored: Int
        if let compressed {
            stored = compressed
        } else {
            // Stored raw: the unshuffled quantized bytes, so a raw frame decodes without the lossless stage.
            payload.copyMemory(from: UnsafeRawBufferPointer(quantized))
            stored = quantizedSize
        }
        writeFrameHeader(output, storedBytes: stored, compressed: compressed != nil)
        return Self.frameHeaderBytes + stored
    }

    /// Decodes `encoded` (exactly one section, as `encode` wrote it) into `keys` and `values`,
    /// `shape.bytesPerPart` bytes each. Corrupt or truncated input throws; it never reads or
    /// writes outside the given buffers.
    public func decode(
        _ encoded: UnsafeRawBufferPointer, shape: SectionShape,
        keys: UnsafeMutableRawBufferPointer, values: UnsafeMutableRawBufferPointer
    ) throws(CodecError) {
        try codec.quantizer.check(shape)
        try Self.expect("keys", keys.count, shape.bytesPerPart)
        try Self.expect("values", values.count, shape.bytesPerPart)
        let quantizedSize = codec.quantizer.sectionSize(shape)

        guard codec.lossless != .none else {
            guard encoded.count == quantizedSize else { throw .truncated(expected: quantizedSize, actual: encoded.count) }
            try QuantizerKernels.decode(codec.quantizer, encoded, shape: shape, keys: keys, values: values)
            return
        }

        guard encoded.count >= Self.frameHeaderBytes else {
            throw .truncated(expected: Self.frameHeaderBytes, actual: encoded.count)
        }
        let stored = Int(encoded.loadUnaligned(fromByteOffset: 0, as: UInt32.self).littleEndian)
        let form = encoded[4]
        guard encoded[5] == 0, encoded[6] == 0, encoded[7] == 0, form <= 1 else {
            throw .corrupt("frame header has unknown form \(form) or non-zero reserved bytes")
        }
        guard stored >= 1, encoded.count == Self.frameHeaderBytes + stored else {
            throw .truncated(expected: Self.frameHeaderBytes + stored, actual: encoded.count)
        }
        let body = UnsafeRawBufferPointer(rebasing: encoded[Self.frameHeaderBytes...])
        if form == 0 {
            guard stored == quantizedSize else { throw .corrupt("raw frame holds \(stored) bytes, expected \(quantizedSize)") }
            try QuantizerKernels.decode(codec.quantizer, body, shape: shape, keys: keys, values: values)
            return
        }
        let staging = reserveScratch(2 * quantizedSize)
        let decompressed = UnsafeMutableRawBufferPointer(rebasing: staging[0..<quantizedSize])
        try compressor.decompress(codec.lossless, body, into: decompressed)
        var quantized = UnsafeRawBufferPointer(decompressed)
        if codec.quantizer == .fp16 {
            let unshuffled = UnsafeMutableRawBufferPointer(rebasing: staging[quantizedSize..<2 * quantizedSize])
            ByteShuffle.unshuffle2(quantized, into: unshuffled)
            quantized = UnsafeRawBufferPointer(unshuffled)
        }
        try QuantizerKernels.decode(codec.quantizer, quantized, shape: shape, keys: keys, values: values)
    }

    private static func expect(_ what: String, _ actual: Int, _ expected: Int) throws(CodecError) {
        guard actual == expected else { throw .bufferSize(what: what, expected: expected, actual: actual) }
    }

    private func reserveScratch(_ count: Int) -> UnsafeMutableRawBufferPointer {
        if scratch.count < count {
            scratch.deallocate()
            scratch = .allocate(byteCount: count, alignment: 64)
        }
        return scratch
    }

    private func writeFrameHeader(_ output: UnsafeMutableRawBufferPointer, storedBytes: Int, compressed: Bool) {
        output.storeBytes(of: UInt32(storedBytes).littleEndian, toByteOffset: 0, as: UInt32.self)
        output[4] = compressed ? 1 : 0
        output[5] = 0
        output[6] = 0
        output[7] = 0
    }
}

extension SectionCodec {
    /// Convenience for tests and tools: encodes arrays of 16-bit elements.
    public func encode(keys: [UInt16], values: [UInt16], shape: SectionShape) throws(CodecError) -> [UInt8] {
        var output = [UInt8](repeating: 0, count: maxEncodedSize(shape))
        let written = output.withUnsafeMutableBytes { out in
            keys.withUnsafeBytes { k in
                values.withUnsafeBytes { v in
                    Result { () throws(CodecError) -> Int in try encode(keys: k, values: v, shape: shape, into: out) }
                }
            }
        }
        output.removeLast(output.count - (try written.get()))
        return output
    }

    /// Convenience for tests and tools: decodes into new arrays of 16-bit elements.
    public func decode(_ encoded: [UInt8], shape: SectionShape) throws(CodecError) -> (keys: [UInt16], values: [UInt16]) {
        var keys = [UInt16](repeating: 0, count: shape.elementsPerPart)
        var values = [UInt16](repeating: 0, count: shape.elementsPerPart)
        let outcome = encoded.withUnsafeBytes { e in
            keys.withUnsafeMutableBytes { k in
                values.withUnsafeMutableBytes { v in
                    Result { () throws(CodecError) in try decode(e, shape: shape, keys: k, values: v) }
                }
            }
        }
        try outcome.get()
        return (keys, values)
    }
}
