import CKVTierKernels
import KVTierCore

/// The model id of `REGISTER_MODEL`: a fingerprint of the model's shape, equal for equal shapes
/// in every process and every client language.
///
/// The hashed bytes are the 15 ASCII bytes `kvtier-model-v1`, one zero byte, then the
/// `REGISTER_MODEL` request body with `pageTokens` replaced by the value in force:
///
///     "kvtier-model-v1" 00
///     u16 len(name) ‖ name (UTF-8) ‖ u16 layers ‖ u16 kvHeads ‖ u16 headDim
///     ‖ u8 elementType ‖ u8 0 ‖ u16 pageTokens ‖ f32 ropeTheta (IEEE bits)
///     [‖ u16 len(diskCodec) ‖ diskCodec (UTF-8)]   only when the model names a disk codec (not empty)
///
/// all little-endian. Without a disk codec the bytes are those of a body from before the field
/// existed, so those ids never change; with one, the same shape is another model (its pages are
/// stored differently, and a lossy copy must never answer a client that asked for a lossless
/// one). The daemon hashes the codec's canonical name (`Codec.name`: `fp16+zstd`, never
/// `fp16+zstd(1)` or `FP16+ZSTD`), so every spelling of one codec gives one id.
///
/// The hash is BLAKE2b with an 8-byte digest (digest length 8 in the parameter block, not a
/// truncated BLAKE2b-512), and the id is those 8 bytes read as a little-endian u64.
/// Python: `int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")`.
public enum ModelFingerprint {
    /// The domain prefix, followed by one zero byte.
    public static let domain = "kvtier-model-v1"

    /// The exact bytes hashed (see the type's documentation).
    public static func hashedBytes(name: String, layers: UInt16, kvHeads: UInt16, headDim: UInt16,
                                   elementType: ElementType, pageTokens: UInt16, ropeTheta: Float,
                                   diskCodec: String? = nil) throws(ProtocolError) -> [UInt8] {
        let diskCodec = diskCodec?.isEmpty == false ? diskCodec : nil
        var writer = ByteWriter(capacity: 34 + name.utf8.count + (diskCodec?.utf8.count ?? 0))
        writer.raw(domain.utf8)
        writer.u8(0)
        let body = RegisterModel(name: name, layers: layers, kvHeads: kvHeads, headDim: headDim,
                                 elementType: elementType, pageTokens: pageTokens, ropeTheta: ropeTheta, diskCodec: diskCodec)
        try body.encode(into: &writer)
        return writer.bytes
    }

    /// The model id; throws only for a name or codec over `maxStringBytes` (which no request can carry).
    public static func modelID(name: String, layers: UInt16, kvHeads: UInt16, headDim: UInt16,
                               elementType: ElementType, pageTokens: UInt16, ropeTheta: Float,
                               diskCodec: String? = nil) throws(ProtocolError) -> UInt64 {
        let input = try hashedBytes(name: name, layers: layers, kvHeads: kvHeads, headDim: headDim,
                                    elementType: elementType, pageTokens: pageTokens, ropeTheta: ropeTheta, diskCodec: diskCodec)
        var state = kvt_blake2b_state()
        kvt_blake2b_init(&state, 8)
        input.withUnsafeBytes { kvt_blake2b_update(&state, $0.baseAddress, $0.count) }
        var digest = [UInt8](repeating: 0, count: 8)
        digest.withUnsafeMutableBufferPointer { kvt_blake2b_final(&state, $0.baseAddress) }
        var id: UInt64 = 0
        for (i, byte) in digest.enumerated() { id |= UInt64(byte) << (8 * UInt64(i)) }
        return id
    }
}
