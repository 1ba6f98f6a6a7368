import CKVTierKernels
import KVTierCore

/// The bridge from quantizers to the C kernels: sizes are checked by the caller
/// (`SectionCodec`), so every pointer handed down covers exactly what the kernel touches.
enum QuantizerKernels {
    static func encode(
        _ quantizer: Quantizer, keys: UnsafeRawBufferPointer, values: UnsafeRawBufferPointer,
        shape: SectionShape, into output: UnsafeMutableRawBufferPointer
    ) throws(CodecError) {
        let sizes = quantizer.partSizes(shape)
        precondition(output.count == sizes.keys + sizes.values, "quantizer output buffer mis-sized")
        let keysOut = output.baseAddress!.assumingMemoryBound(to: UInt8.self)
        let valuesOut = keysOut + sizes.keys
        let k = keys.baseAddress!.assumingMemoryBound(to: UInt16.self)
        let v = values.baseAddress!.assumingMemoryBound(to: UInt16.self)
        let (t, h, d) = (shape.tokens, shape.kvHeads, shape.headDim)
        let dtype = Int32(shape.elementType.rawValue)
        var badKeys = 0, badValues = 0
        switch quantizer {
        case .fp16:
            output.copyMemory(from: keys)
            UnsafeMutableRawBufferPointer(rebasing: output[sizes.keys...]).copyMemory(from: values)
        case .q8:
            badKeys = kvt_q8_encode(k, t, h, d, dtype, keysOut)
            badValues = kvt_q8_encode(v, t, h, d, dtype, valuesOut)
        case .k4v4:
            badKeys = kvt_k4v4_encode_keys(k, t, h, d, dtype, keysOut)
            badValues = kvt_k4v4_encode_values(v, t, h, d, dtype, valuesOut)
        case .tq4, .tq3:
            let bits = Int32(quantizer == .tq4 ? 4 : 3)
            badKeys = kvt_tq_encode(k, t * h, d, bits, dtype, keysOut)
            badValues = kvt_tq_encode(v, t * h, d, bits, dtype, valuesOut)
        case .tq3m:
            badKeys = kvt_tqm_encode(k, t, h, d, 3, dtype, keysOut)
            badValues = kvt_tqm_encode(v, t, h, d, 3, dtype, valuesOut)
        case .tq3s, .tq2s:
            let layout = MixedTQLayout(quantizer)!
            (badKeys, badValues) = withUnsafeTemporaryAllocation(of: Float.self, capacity: t) { scratch in
                (encodeMixed(layout.keys, k, shape, layout.exactTokens, scratch.baseAddress!, keysOut),
                 encodeMixed(layout.values, v, shape, layout.exactTokens, scratch.baseAddress!, valuesOut))
            }
        }
        // A negative count is SIZE_MAX: arguments `Quantizer.check` should have refused.
        precondition(badKeys >= 0 && badValues >= 0, "kernel refused a shape that passed Quantizer.check")
        if badKeys > 0 { throw .nonFiniteInput(part: "keys", count: badKeys) }
        if badValues > 0 { throw .nonFiniteInput(part: "values", count: badValues) }
    }

    static func decode(
        _ quantizer: Quantizer, _ input: UnsafeRawBufferPointer, shape: SectionShape,
        keys: UnsafeMutableRawBufferPointer, values: UnsafeMutableRawBufferPointer
    ) throws(CodecError) {
        let sizes = quantizer.partSizes(shape)
        precondition(input.count == sizes.keys + sizes.values, "quantizer input buffer mis-sized")
        let keysIn = input.baseAddress!.assumingMemoryBound(to: UInt8.self)
        let valuesIn = keysIn + sizes.keys
        let k = keys.baseAddress!.assumingMemoryBound(to: UInt16.self)
        let v = values.baseAddress!.assumingMemoryBound(to: UInt16.self)
        let (t, h, d) = (shape.tokens, shape.kvHeads, shape.headDim)
        let dtype = Int32(shape.elementType.rawValue)
        var statuses: (Int32, Int32) = (0, 0)
        switch quantizer {
        case .fp16:
            keys.copyMemory(from: UnsafeRawBufferPointer(rebasing: input[0..<sizes.keys]))
            values.copyMemory(from: UnsafeRawBufferPointer(rebasing: input[sizes.keys...]))
        case .q8:
            statuses = (kvt_q8_decode(keysIn, t, h, d, dtype, k), kvt_q8_decode(valuesIn, t, h, d, dtype, v))
        case .k4v4:
            statuses = (kvt_k4v4_decode_keys(keysIn, t, h, d, dtype, k), kvt_k4v4_decode_values(valuesIn, t, h, d, dtype, v))
        case .tq4, .tq3:
            let bits = Int32(quantizer == .tq4 ? 4 : 3)
            statuses = (kvt_tq_decode(keysIn, t * h, d, bits, dtype, k), kvt_tq_decode(valuesIn, t * h, d, bits, dtype, v))
        case .tq3m:
            statuses = (kvt_tqm_decode(keysIn, t, h, d, 3, dtype, k), kvt_tqm_decode(valuesIn, t, h, d, 3, dtype, v))
        case .tq3s, .tq2s:
            let layout = MixedTQLayout(quantizer)!
            statuses = (decodeMixed(layout.keys, keysIn, shape, layout.exactTokens, k),
                        decodeMixed(layout.values, valuesIn, shape, layout.exactTokens, v))
        }
        precondition(statuses.0 >= 0 && statuses.1 >= 0, "kernel refused a shape that passed Quantizer.check")
        if statuses.0 != 0 || statuses.1 != 0 {
            let part = statuses.0 != 0 ? "keys" : "values"
            if MixedTQLayout(quantizer) != nil {
                throw .corrupt("\(quantizer.name) \(part) hold a non-finite kept element or mean, or a non-finite or negative maximum alpha")
            }
            throw .corrupt("\(quantizer.name) \(part) hold a non-finite or negative scale or minimum")
        }
    }

    private static func encodeMixed(
        _ part: MixedTQLayout.Part, _ source: UnsafePointer<UInt16>, _ shape: SectionShape, _ exactTokens: Int,
        _ scratch: UnsafeMutablePointer<Float>, _ output: UnsafeMutablePointer<UInt8>
    ) -> Int {
        kvt_tqx_encode(source, shape.tokens, shape.kvHeads, shape.headDim, Int32(shape.elementType.rawValue),
                       Int32(part.bits), part.half ? 1 : 0, part.centred ? 1 : 0, part.projectionAlpha ? 1 : 0,
                       exactTokens, scratch, output)
    }

    private static func decodeMixed(
        _ part: MixedTQLayout.Part, _ input: UnsafePointer<UInt8>, _ shape: SectionShape, _ exactTokens: Int,
        _ output: UnsafeMutablePointer<UInt16>
    ) -> Int32 {
        kvt_tqx_decode(input, shape.tokens, shape.kvHeads, shape.headDim, Int32(shape.elementType.rawValue),
                       Int32(part.bits), part.half ? 1 : 0, part.centred ? 1 : 0, exactTokens, output)
    }
}

/// Byte-plane shuffle of 2-byte elements: all low bytes, then all high bytes.
enum ByteShuffle {
    static func shuffle2(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer) {
        precondition(source.count == destination.count && source.count % 2 == 0)
        kvt_shuffle2(source.baseAddress!.assumingMemoryBound(to: UInt8.self), source.count / 2,
                     destination.baseAddress!.assumingMemoryBound(to: UInt8.self))
    }

    static func unshuffle2(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer) {
        precondition(source.count == destination.count && source.count % 2 == 0)
        kvt_unshuffle2(source.baseAddress!.assumingMemoryBound(to: UInt8.self), source.count / 2,
                       destination.baseAddress!.assumingMemoryBound(to: UInt8.self))
    }
}

/// Which SIMD path the kernels use. Tests force each available level in turn.
public enum KernelLevel: Int, Sendable, CaseIterable, Comparable, CustomStringConvertible {
    case scalar = 0
    case avx2 = 1
    case avx512 = 2

    /// The best level this CPU supports.
    public static var best: KernelLevel { KernelLevel(rawValue: Int(kvt_cpu_level())) ?? .scalar }

    /// The level in force now.
    public static var current: KernelLevel { KernelLevel(rawValue: Int(kvt_get_level())) ?? .scalar }

    /// Forces a level (clamped to what the CPU supports) and returns the one in force.
    @discardableResult
    public static func force(_ level: KernelLevel) -> KernelLevel {
        KernelLevel(rawValue: Int(kvt_set_level(Int32(level.rawValue)))) ?? .scalar
    }

    public static func < (a: KernelLevel, b: KernelLevel) -> Bool { a.rawValue < b.rawValue }

    public var description: String {
        switch self {
        case .scalar: "scalar"
        case .avx2: "avx2"
        case .avx512: "avx512"
        }
    }
}
