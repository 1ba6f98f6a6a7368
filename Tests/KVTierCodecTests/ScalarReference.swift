import KVTierCore

/// A plain, loop-by-loop implementation of docs/codec-layouts.md, written independently of the
/// SIMD kernels so that each checks the other. Slow on purpose: no cleverness to get wrong.
enum ScalarReference {
    static func f16(_ x: Float) -> UInt16 { Float16(x).bitPattern }
    static func f16Value(_ x: Float) -> Float { Float(Float16(x)) }
    static func fromF16(_ bits: UInt16) -> Float { Float(Float16(bitPattern: bits)) }
    static func rne(_ x: Float) -> Int { Int(x.rounded(.toNearestOrEven)) }

    static func put16(_ out: inout [UInt8], _ v: UInt16) {
        out.append(UInt8(v & 0xFF))
        out.append(UInt8(v >> 8))
    }

    static func get16(_ bytes: [UInt8], _ at: Int) -> UInt16 { UInt16(bytes[at]) | UInt16(bytes[at + 1]) << 8 }

    static func pack4(_ codes: ArraySlice<Int>) -> [UInt8] {
        let c = Array(codes)
        precondition(c.count == 32)
        return (0..<16).map { UInt8(c[$0] | c[$0 + 16] << 4) }
    }

    static func unpack4(_ bytes: [UInt8], _ at: Int) -> [Int] {
        (0..<32).map { i in i < 16 ? Int(bytes[at + i] & 0xF) : Int(bytes[at + i - 16] >> 4) }
    }

    static func pack2(_ c: [Int]) -> [UInt8] {
        (0..<8).map { (i: Int) -> UInt8 in
            var byte = 0
            for lane in 0..<4 { byte |= (c[i + 8 * lane] & 3) << (2 * lane) }
            return UInt8(byte)
        }
    }

    static func pack3(_ c: [Int]) -> [UInt8] {
        var high: UInt32 = 0
        for j in 0..<32 where c[j] & 4 != 0 { high |= 1 << UInt32(j) }
        return pack2(c) + [UInt8(high & 0xFF), UInt8(high >> 8 & 0xFF), UInt8(high >> 16 & 0xFF), UInt8(high >> 24)]
    }

    static func unpack(_ bytes: [UInt8], _ at: Int, bits: Int) -> [Int] {
        switch bits {
        case 4: return unpack4(bytes, at)
        default:
            var codes = (0..<32).map { j in Int(bytes[at + j % 8] >> UInt8(2 * (j / 8)) & 3) }
            if bits == 3 {
                let high = UInt32(bytes[at + 8]) | UInt32(bytes[at + 9]) << 8 | UInt32(bytes[at + 10]) << 16 | UInt32(bytes[at + 11]) << 24
                for j in 0..<32 where high >> UInt32(j) & 1 == 1 { codes[j] |= 4 }
            }
            return codes
        }
    }

    // MARK: q8

    static func q8Encode(_ x: [Float], vectors: Int, d: Int) -> [UInt8] {
        var out: [UInt8] = []
        for v in 0..<vectors {
            let row = x[v * d..<(v + 1) * d]
            let amax = row.map { abs($0) }.max()!
            let s = f16Value(amax / 127)
            let inv: Float = s > 0 ? 1 / s : 0
            put16(&out, f16(amax / 127))
            for value in row {
                let code = max(-127, min(127, rne(value * inv)))
                out.append(UInt8(bitPattern: Int8(code)))
            }
        }
        return out
    }

    static func q8Decode(_ bytes: [UInt8], vectors: Int, d: Int) -> [Float] {
        var out: [Float] = []
        for v in 0..<vectors {
            let base = v * (d + 2)
            let s = fromF16(get16(bytes, base))
            for i in 0..<d { out.append(Float(Int8(bitPattern: bytes[base + 2 + i])) * s) }
        }
        return out
    }

    // MARK: k4v4

    /// Minimum and maximum in the total order the kernels use, where -0 < +0.
    static func lowest(_ x: [Float]) -> Float { x.reduce(.infinity) { $1 < $0 || ($1 == $0 && $1.sign == .minus) ? $1 : $0 } }
    static func highest(_ x: [Float]) -> Float { x.reduce(-.infinity) { $1 > $0 || ($1 == $0 && $1.sign == .plus) ? $1 : $0 } }

    static func asymmetric(_ lo: Float, _ hi: Float) -> (m: Float, s: Float, inv: Float, mBits: UInt16, sBits: UInt16) {
        let mBits = f16(lo), sBits = f16((hi - lo) / 15)
        let m = fromF16(mBits), s = fromF16(sBits)
        return (m, s, s > 0 ? 1 / s : 0, mBits, sBits)
    }

    static func code4(_ x: Float, _ m: Float, _ inv: Float) -> Int { max(0, min(15, rne((x - m) * inv))) }

    static func k4v4EncodeKeys(_ x: [Float], t: Int, h: Int, d: Int) -> [UInt8] {
        var out: [UInt8] = []
        let row = h * d
        for g in stride(from: 0, to: t, by: 32) {
            let n = min(32, t - g)
            var params: [(m: Float, s: Float, inv: Float, mBits: UInt16, sBits: UInt16)] = []
            for c in 0..<row {
                let column = (g..<g + n).map { x[$0 * row + c] }
                params.append(asymmetric(lowest(column), highest(column)))
            }
            for p in params { put16(&out, p.mBits) }
            for p in params { put16(&out, p.sBits) }
            for tok in g..<g + n {
                for block in stride(from: 0, to: row, by: 32) {
                    let codes = (block..<block + 32).map { c in code4(x[tok * row + c], params[c].m, params[c].inv) }
                    out += pack4(codes[...])
                }
            }
        }
        return out
    }

    static func k4v4DecodeKeys(_ bytes: [UInt8], t: Int, h: Int, d: Int) -> [Float] {
        var out = [Float](repeating: 0, count: t * h * d)
        let row = h * d
        var at = 0
        for g in stride(from: 0, to: t, by: 32) {
            let n = min(32, t - g)
            let mins = (0..<row).map { fromF16(get16(bytes, at + 2 * $0)) }
            let scales = (0..<row).map { fromF16(get16(bytes, at + 2 * row + 2 * $0)) }
            at += 4 * row
            for tok in g..<g + n {
                for block in stride(from: 0, to: row, by: 32) {
                    let codes = unpack4(bytes, at)
                    at += 16
                    for i in 0..<32 {
                        let c = block + i
                        out[tok * row + c] = mins[c].addingProduct(Float(codes[i]), scales[c])
                    }
                }
            }
        }
        return out
    }

    static func k4v4EncodeValues(_ x: [Float], t: Int, h: Int, d: Int) -> [UInt8] {
        var out: [UInt8] = []
        for start in stride(from: 0, to: t * h * d, by: 32) {
            let group = x[start..<start + 32]
            let p = asymmetric(lowest(Array(group)), highest(Array(group)))
            put16(&out, p.mBits)
            put16(&out, p.sBits)
            out += pack4(group.map { code4($0, p.m, p.inv) }[...])
        }
        return out
    }

    static func k4v4DecodeValues(_ bytes: [UInt8], t: Int, h: Int, d: Int) -> [Float] {
        var out: [Float] = []
        for group in 0..<(t * h * d / 32) {
            let at = group * 20
            let m = fromF16(get16(bytes, at)), s = fromF16(get16(bytes, at + 2))
            for code in unpack4(bytes, at + 4) { out.append(m.addingProduct(Float(code), s)) }
        }
        return out
    }

    // MARK: tq

    static let codebooks: [Int: [Float]] = [
        2: [-1.5104176, -0.4527800, 0.4527800, 1.5104176],
        3: [-2.1519456, -1.3439093, -0.7560053, -0.2450942, 0.2450942, 0.7560053, 1.3439093, 2.1519456],
        4: [-2.7325895, -2.0690172, -1.6180464, -1.2562312, -0.9423404, -0.6567591, -0.3880483, -0.1283950,
            0.1283950, 0.3880483, 0.6567591, 0.9423404, 1.2562312, 1.6180464, 2.0690172, 2.7325895],
    ]

    static func signs(_ d: Int) -> [Float] {
        var state: UInt64 = 0x6B76_7469_6572_0001
        return (0..<d).map { _ in
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            z ^= z >> 31
            return z >> 63 == 1 ? -1 : 1
        }
    }

    static func fwht(_ y: inout [Float]) {
        var len = 1
        while len < y.count {
            for j in 0..<y.count where j % (2 * len) < len {
                let (a, b) = (y[j], y[j + len])
                y[j] = a + b
                y[j + len] = a - b
            }
            len *= 2
        }
    }

    /// Returns the codes and the fp16 α of one vector.
    static func tqEncodeVector(_ x: [Float], bits: Int) -> (codes: [Int], alpha: UInt16) {
        let d = x.count, levels = codebooks[bits]!, sign = signs(d)
        var y = zip(sign, x).map { $0 * $1 }
        fwht(&y)
        let rms = (y.reduce(0) { $0 + $1 * $1 } / Float(d)).squareRoot()
        if rms == 0 { return ([Int](repeating: 1 << (bits - 1), count: d), 0) }
        let boundaries = (0..<levels.count - 1).map { (levels[$0] + levels[$0 + 1]) / 2 }
        let codes = y.map { v in boundaries.filter { $0 <= v / rms }.count }
        var numerator: Float = 0, denominator: Float = 0
        for (v, c) in zip(y, codes) {
            numerator += v * levels[c]
            denominator += levels[c] * levels[c]
        }
        return (codes, f16(numerator / denominator))
    }

    static func tqDecodeVector(codes: [Int], alpha: UInt16, bits: Int) -> [Float] {
        let d = codes.count, levels = codebooks[bits]!, sign = signs(d)
        let a = fromF16(alpha)
        var y = codes.map { a * levels[$0] }
        fwht(&y)
        return zip(sign, y).map { $0 * $1 / Float(d) }
    }

    static func tqEncode(_ x: [Float], vectors: Int, d: Int, bits: Int) -> [UInt8] {
        var out: [UInt8] = []
        for v in 0..<vectors {
            let (codes, alpha) = tqEncodeVector(Array(x[v * d..<(v + 1) * d]), bits: bits)
            put16(&out, alpha)
            for block in stride(from: 0, to: d, by: 32) {
                let c = Array(codes[block..<block + 32])
                out += bits == 4 ? pack4(c[...]) : bits == 3 ? pack3(c) : pack2(c)
            }
        }
        return out
    }

    static func tqDecode(_ bytes: [UInt8], vectors: Int, d: Int, bits: Int) -> [Float] {
        let size = 2 + d * bits / 8
        var out: [Float] = []
        for v in 0..<vectors {
            let at = v * size
            var codes: [Int] = []
            for block in 0..<(d / 32) { codes += unpack(bytes, at + 2 + block * 4 * bits, bits: bits) }
            out += tqDecodeVector(codes: codes, alpha: get16(bytes, at), bits: bits)
        }
        return out
    }

    // MARK: tq3m

    static func tq3mEncode(_ x: [Float], t: Int, h: Int, d: Int) -> [UInt8] {
        var out: [UInt8] = []
        var means = [Float](repeating: 0, count: h * d)
        for c in 0..<h * d {
            var sum: Float = 0
            for tok in 0..<t { sum += x[tok * h * d + c] }
            put16(&out, f16(sum / Float(t)))
            means[c] = f16Value(sum / Float(t))
        }
        for v in 0..<t * h {
            let head = v % h
            let centred = (0..<d).map { x[v * d + $0] - means[head * d + $0] }
            out += tqEncode(centred, vectors: 1, d: d, bits: 3)
        }
        return out
    }

    static func tq3mDecode(_ bytes: [UInt8], t: Int, h: Int, d: Int) -> [Float] {
        let means = (0..<h * d).map { fromF16(get16(bytes, 2 * $0)) }
        let residual = tqDecode(Array(bytes[(2 * h * d)...]), vectors: t * h, d: d, bits: 3)
        return residual.enumerated().map { i, r in r + means[(i / d) % h * d + i % d] }
    }
}
