#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import KVTierCodec
import KVTierCore

/// Single-core codec throughput over a working set larger than the last-level cache, with a
/// memcpy of the same working set measured in the same run as the baseline.
public struct CodecBenchmark {
    public struct Report: Codable, Sendable {
        public var codec: String
        public var shape: [Int]
        public var sections: Int
        /// fp16 bytes (keys + values) in the working set.
        public var workingSetBytes: Int
        public var encodedBytes: Int
        public var bitsPerElement: Double
        /// fp16 bytes consumed per second while encoding.
        public var encodeGBps: Double
        /// fp16 bytes produced per second while decoding.
        public var decodeGBps: Double
        /// Bytes copied per second by memcpy over the same working set.
        public var memcpyGBps: Double
        public var encodeVsMemcpy: Double
        public var decodeVsMemcpy: Double
        public var repetitions: Int
        public var kernelLevel: String
    }

    public var codec: Codec
    public var shape: SectionShape
    public var workingSet: ByteCount
    public var repetitions: Int

    /// Defaults: sections of `[256, 8, 128]` float16 (one Llama-3-8B layer of a 256-token page),
    /// 96 MiB of them, best of 5.
    public init(codec: Codec, shape: SectionShape = SectionShape(tokens: 256, kvHeads: 8, headDim: 128),
                workingSet: ByteCount = .mebibytes(96), repetitions: Int = 5) {
        self.codec = codec
        self.shape = shape
        self.workingSet = workingSet
        self.repetitions = repetitions
    }

    public func run() throws -> Report {
        try codec.quantizer.check(shape)
        let sections = max(1, (workingSet.bytes + shape.rawBytes - 1) / shape.rawBytes)
        let part = shape.bytesPerPart
        let encoder = SectionCodec(codec)
        let slot = encoder.maxEncodedSize(shape)

        let input = UnsafeMutableRawBufferPointer.allocate(byteCount: sections * 2 * part, alignment: 64)
        let output = UnsafeMutableRawBufferPointer.allocate(byteCount: sections * 2 * part, alignment: 64)
        let encoded = UnsafeMutableRawBufferPointer.allocate(byteCount: sections * slot, alignment: 64)
        defer { input.deallocate(); output.deallocate(); encoded.deallocate() }

        // A few distinct sections repeated across the working set: realistic statistics
        // without spending the benchmark's time generating random numbers.
        let distinct = min(sections, 8)
        for s in 0..<distinct {
            let (keys, values) = SyntheticKV.section(shape, seed: 0x5EED + UInt64(s))
            keys.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: input[(2 * s) * part..<(2 * s + 1) * part]).copyMemory(from: $0) }
            values.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: input[(2 * s + 1) * part..<(2 * s + 2) * part]).copyMemory(from: $0) }
        }
        for s in distinct..<sections {
            let source = (s % distinct) * 2 * part
            UnsafeMutableRawBufferPointer(rebasing: input[s * 2 * part..<(s + 1) * 2 * part])
                .copyMemory(from: UnsafeRawBufferPointer(rebasing: input[source..<source + 2 * part]))
        }
        output.initializeMemory(as: UInt8.self, repeating: 0)
        encoded.initializeMemory(as: UInt8.self, repeating: 0)

        var sizes = [Int](repeating: 0, count: sections)
        let encodeSeconds = try Stopwatch.best(repetitions: repetitions) {
            for s in 0..<sections {
                sizes[s] = try encoder.encode(
                    keys: UnsafeRawBufferPointer(rebasing: input[(2 * s) * part..<(2 * s + 1) * part]),
                    values: UnsafeRawBufferPointer(rebasing: input[(2 * s + 1) * part..<(2 * s + 2) * part]),
                    shape: shape, into: UnsafeMutableRawBufferPointer(rebasing: encoded[s * slot..<(s + 1) * slot]))
            }
        }
        let decodeSeconds = try Stopwatch.best(repetitions: repetitions) {
            for s in 0..<sections {
                try encoder.decode(
                    UnsafeRawBufferPointer(rebasing: encoded[s * slot..<s * slot + sizes[s]]), shape: shape,
                    keys: UnsafeMutableRawBufferPointer(rebasing: output[(2 * s) * part..<(2 * s + 1) * part]),
                    values: UnsafeMutableRawBufferPointer(rebasing: output[(2 * s + 1) * part..<(2 * s + 2) * part]))
            }
        }
        let total = sections * 2 * part
        let memcpySeconds = Stopwatch.best(repetitions: repetitions) {
            memcpy(output.baseAddress!, input.baseAddress!, total)
        }
        let encodedBytes = sizes.reduce(0, +)
        let memcpyGBps = Double(total) / memcpySeconds / 1e9
        let encodeGBps = Double(total) / encodeSeconds / 1e9
        let decodeGBps = Double(total) / decodeSeconds / 1e9
        return Report(
            codec: codec.name, shape: [shape.tokens, shape.kvHeads, shape.headDim], sections: sections,
            workingSetBytes: total, encodedBytes: encodedBytes,
            bitsPerElement: Double(encodedBytes * 8) / Double(sections * shape.elements),
            encodeGBps: encodeGBps, decodeGBps: decodeGBps, memcpyGBps: memcpyGBps,
            encodeVsMemcpy: encodeGBps / memcpyGBps, decodeVsMemcpy: decodeGBps / memcpyGBps,
            repetitions: repetitions, kernelLevel: KernelLevel.current.description)
    }
}
