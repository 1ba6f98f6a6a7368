/// How `tq3s` and `tq2s` code a section (docs/codec-layouts.md, "`tq3s` and `tq2s`"): the
/// page's first tokens kept as given, then per part an optional per-channel mean and rotated
/// vectors with mixed-width Lloyd–Max codes and a one-byte log-scale alpha.
struct MixedTQLayout {
    struct Part {
        /// Bits of every rotated coordinate: 2 or 3.
        var bits: Int
        /// The first 16 coordinates of every block of 32 get one bit more.
        var half: Bool
        /// The page's per-channel mean (fp16) is removed before coding.
        var centred: Bool
        /// Alpha keeps the vector's projection on the original (|y|² / y·L) instead of the
        /// least-squares fit (y·L / |L|², which shrinks it).
        var projectionAlpha = false

        /// Bytes of one block of 32 codes: the low two bits of each (8), bit 2 of each when
        /// `bits` is 3 (4), the extra bit of the first 16 when `half` (2).
        var blockBytes: Int { 8 + (bits == 3 ? 4 : 0) + (half ? 2 : 0) }

        /// Exact bytes of this part for `shape`.
        func bytes(_ shape: SectionShape, exactTokens: Int) -> Int {
            let t = shape.tokens, h = shape.kvHeads, d = shape.headDim
            let exact = min(exactTokens, t)
            return exact * h * d * 2 + (centred ? h * d * 2 : 0) + h * 2 + (t - exact) * h * (1 + d / 32 * blockBytes)
        }

        var bitsPerCoordinate: Double { Double(bits) + (half ? 0.5 : 0) }
    }

    var keys: Part
    var values: Part
    /// Leading tokens of every page stored as given: an attention sink sits at a sequence's
    /// start and takes much of the attention, so its error does not average out.
    var exactTokens: Int

    init?(_ quantizer: Quantizer) {
        switch quantizer {
        case .tq3s:
            keys = Part(bits: 3, half: false, centred: true)
            values = Part(bits: 2, half: true, centred: true)
        case .tq2s:
            keys = Part(bits: 2, half: true, centred: true)
            values = Part(bits: 2, half: false, centred: true)
        default:
            return nil
        }
        exactTokens = 1
    }
}
