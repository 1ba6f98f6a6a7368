/*
 * kvtier_kernels.h - SIMD kernels for the KVTier codecs (public C API).
 *
 * Byte layouts follow docs/codec-layouts.md bit for bit. Every kernel has a
 * portable scalar path and, on x86_64, AVX2 (+FMA, F16C) and AVX-512
 * (F/BW/VL/DQ/VBMI) paths chosen at run time. All paths produce identical
 * bytes for q8 and k4v4 (encode output and decode output); tq and tqm may differ in
 * the last bit of a scale and, rarely, in a code next to a boundary, as the
 * spec allows.
 *
 * Conventions:
 *  - Element arrays are `uint16_t` holding float16 or bfloat16 bit patterns
 *    (dtype KVT_F16 or KVT_BF16). Parts are shaped [T, H, D] row-major.
 *  - Pointers may be unaligned. Kernels never allocate and never touch
 *    bytes outside [p, p + size) for the sizes given by the *_size functions.
 *  - Encoders return the number of failures: non-finite input elements plus
 *    groups whose fp16 minimum or scale would overflow (possible for bf16
 *    input, and for tq). 0 means success; on failure the output bytes are
 *    unspecified. They return SIZE_MAX on invalid arguments (bad dtype, D not
 *    allowed by the codec, bits not in {2,3,4}).
 *  - Decoders return 0 on success, 1 if stored bytes are corrupt (a scale that
 *    is NaN, Inf or < 0, or a minimum that is NaN or Inf; -0 is accepted),
 *    -1 on invalid arguments. After a non-zero return the output content is
 *    unspecified, but nothing outside the buffers was touched.
 *  - Kernels assume the default floating-point environment (round to
 *    nearest even, no flush-to-zero / denormals-are-zero).
 *  - Size computations do not check for size_t overflow.
 */
#ifndef KVTIER_KERNELS_H
#define KVTIER_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Element types of a section (values match the Swift ElementType). */
enum kvt_dtype { KVT_F16 = 1, KVT_BF16 = 2 };

/** Dispatch levels. */
enum kvt_level { KVT_LEVEL_SCALAR = 0, KVT_LEVEL_AVX2 = 1, KVT_LEVEL_AVX512 = 2 };

/* ---- CPU dispatch ------------------------------------------------------ */

/** Best level this CPU supports: 0 scalar, 1 AVX2+FMA+F16C, 2 AVX-512 (F/BW/VL/DQ/VBMI). */
int kvt_cpu_level(void);
/** Force a level (clamped to [0, kvt_cpu_level()]); returns the level now in force. Atomic. */
int kvt_set_level(int level);
/** Level currently in force (kvt_cpu_level() unless kvt_set_level lowered it). */
int kvt_get_level(void);

/* ---- Bulk conversions (round to nearest even; NaN stays NaN, quieted) --- */

/** float16 -> float32, exact. */
void kvt_f16_to_f32(const uint16_t *src, size_t count, float *dst);
/** float32 -> float16, round to nearest even, overflow to +-Inf. */
void kvt_f32_to_f16(const float *src, size_t count, uint16_t *dst);
/** bfloat16 -> float32, exact. */
void kvt_bf16_to_f32(const uint16_t *src, size_t count, float *dst);
/** float32 -> bfloat16, round to nearest even. */
void kvt_f32_to_bf16(const float *src, size_t count, uint16_t *dst);
/** Count elements whose exponent bits are all ones (NaN or +-Inf) for the dtype. 0 for a bad dtype. */
size_t kvt_count_nonfinite(const uint16_t *src, size_t count, int dtype);

/* ---- Byte-plane shuffle for 2-byte elements ----------------------------- */

/** dst[0..count) = low bytes of the count elements, dst[count..2count) = high bytes. src, dst: 2*count bytes, must not overlap. */
void kvt_shuffle2(const uint8_t *src, size_t count, uint8_t *dst);
/** Inverse of kvt_shuffle2. src, dst: 2*count bytes, must not overlap. */
void kvt_unshuffle2(const uint8_t *src, size_t count, uint8_t *dst);

/* ---- q8: int8 per (t, h) vector, fp16 scale ----------------------------- */

/** Bytes of one q8 part: T*H*(D+2). */
size_t kvt_q8_part_size(size_t T, size_t H, size_t D);
/** Encode one part [T,H,D] into kvt_q8_part_size bytes. Returns failures (0 = ok) or SIZE_MAX. */
size_t kvt_q8_encode(const uint16_t *src, size_t T, size_t H, size_t D, int dtype, uint8_t *dst);
/** Decode one q8 part into T*H*D elements of dtype. Returns 0, 1 (corrupt scale) or -1. */
int kvt_q8_decode(const uint8_t *src, size_t T, size_t H, size_t D, int dtype, uint16_t *dst);

/* ---- k4v4: KIVI-style 4-bit (D % 32 == 0) ------------------------------- */

/** Bytes of the keys part: ceil(T/32)*H*D*4 + T*H*D/2; 0 if D % 32 != 0. */
size_t kvt_k4v4_keys_size(size_t T, size_t H, size_t D);
/** Bytes of the values part: T*H*(D/32)*20; 0 if D % 32 != 0. */
size_t kvt_k4v4_values_size(size_t T, size_t H, size_t D);
/** Encode keys (per channel over 32-token groups). Returns failures (0 = ok) or SIZE_MAX. */
size_t kvt_k4v4_encode_keys(const uint16_t *src, size_t T, size_t H, size_t D, int dtype, uint8_t *dst);
/** Decode keys into T*H*D elements. Returns 0, 1 (corrupt min/scale) or -1. */
int kvt_k4v4_decode_keys(const uint8_t *src, size_t T, size_t H, size_t D, int dtype, uint16_t *dst);
/** Encode values (per token over 32-channel groups). Returns failures (0 = ok) or SIZE_MAX. */
size_t kvt_k4v4_encode_values(const uint16_t *src, size_t T, size_t H, size_t D, int dtype, uint8_t *dst);
/** Decode values into T*H*D elements. Returns 0, 1 (corrupt min/scale) or -1. */
int kvt_k4v4_decode_values(const uint8_t *src, size_t T, size_t H, size_t D, int dtype, uint16_t *dst);

/* ---- tq: random-sign Hadamard + Lloyd-Max, bits in {2,3,4}, D in {32,64,128,256} ---- */

/** Bytes per vector: 2 + D*bits/8; 0 if D or bits is not allowed. */
size_t kvt_tq_vector_size(size_t D, int bits);
/** Encode `vectors` vectors of D elements (one part: vectors = T*H). Returns failures (non-finite elements + vectors whose fp16 alpha overflows) or SIZE_MAX. */
size_t kvt_tq_encode(const uint16_t *src, size_t vectors, size_t D, int bits, int dtype, uint8_t *dst);
/** Decode `vectors` vectors into elements of dtype. Returns 0, 1 (non-finite alpha) or -1. */
int kvt_tq_decode(const uint8_t *src, size_t vectors, size_t D, int bits, int dtype, uint16_t *dst);
/** Same as kvt_tq_encode on float32 input (e.g. after subtracting per-channel means). */
size_t kvt_tq_encode_f32(const float *src, size_t vectors, size_t D, int bits, uint8_t *dst);
/** Same as kvt_tq_decode but writes float32 (no final rounding to a 16-bit type). */
int kvt_tq_decode_f32(const uint8_t *src, size_t vectors, size_t D, int bits, float *dst);

/* ---- tqm: per-channel mean + tq of the residuals (layout: docs/codec-layouts.md) ----
 * A part is [mean: H*D fp16, index h*D + d][for each (t, h) in order: tq block of x - mean[h]].
 * Same D and bits as tq. Failures: non-finite elements, + 1 per mean (of an all-finite column)
 * that overflows fp16, + 1 per vector (of a head whose means are all finite) whose fp16 alpha is
 * not finite. No heap; the source is read twice (means, then the vectors). */

/** Bytes of one tqm part: H*D*2 + T*H*(2 + D*bits/8); 0 if D or bits is not allowed. */
size_t kvt_tqm_part_size(size_t T, size_t H, size_t D, int bits);
/** Encode one part [T,H,D] into kvt_tqm_part_size bytes. Returns failures (0 = ok) or SIZE_MAX. */
size_t kvt_tqm_encode(const uint16_t *src, size_t T, size_t H, size_t D, int bits, int dtype, uint8_t *dst);
/** Decode one tqm part into T*H*D elements of dtype. Returns 0, 1 (non-finite mean or alpha) or -1. */
int kvt_tqm_decode(const uint8_t *src, size_t T, size_t H, size_t D, int bits, int dtype, uint16_t *dst);

/* ---- tqx: the parts of tq3s and tq2s (layout: docs/codec-layouts.md, "tq3s and tq2s") ----
 * A part is [the first `exact` tokens as given: exact*H*D 16-bit elements][mean: H*D fp16 when
 * center][amax: H fp16][for each later (t, h): q u8, D/32 code blocks]. Every coordinate has
 * `bits` (2 or 3) bits, and when `half` the first 16 of every 32 one more. proj picks the alpha
 * that keeps the projection (|y|^2 / y.L) instead of the least-squares one. D as tq. Scalar. */

/** Bytes of one part; 0 if D, bits or half is not allowed. */
size_t kvt_tqx_part_size(size_t T, size_t H, size_t D, int bits, int half, int center, size_t exact);
/** Encode one part [T,H,D]. scratch: T floats. Returns failures (non-finite elements, else means
 * and per-head maxima that overflow fp16; 0 = ok) or SIZE_MAX for bad arguments. */
size_t kvt_tqx_encode(const uint16_t *src, size_t T, size_t H, size_t D, int dtype, int bits, int half, int center,
                      int proj, size_t exact, float *scratch, uint8_t *dst);
/** Decode one part into T*H*D elements of dtype. Returns 0, 1 (a kept element or a mean that is
 * not finite, or a maximum that is not finite or is negative) or -1 for bad arguments. */
int kvt_tqx_decode(const uint8_t *src, size_t T, size_t H, size_t D, int dtype, int bits, int half, int center,
                   size_t exact, uint16_t *dst);

/* ---- Quality measurement (not a codec; used by `kvtier codec advise`) ---- */

/**
 * Causal attention softmax(q k^T / sqrt(D)) v, in float32, for `count` query positions.
 * q: [T, QH, D]; k, v: [T, KH, D]; QH a multiple of KH, query head h reads KV head h / (QH/KH).
 * Position p attends to keys 0...positions[p]. scores: scratch of T floats.
 * out: [count, QH, D]. Returns 0, or -1 on invalid arguments (a position >= T, QH % KH != 0).
 */
int kvt_causal_attention_f32(const float *q, const float *k, const float *v, size_t T, size_t QH, size_t KH,
                             size_t D, const uint32_t *positions, size_t count, float *scores, float *out);

/**
 * Attention of `count` queries q: [count, QH, D] that all stand after the last of T tokens (each
 * attends keys 0...T-1), as a decoding step's queries do. scores: T floats; out: [count, QH, D].
 * Returns 0, or -1 on invalid arguments.
 */
int kvt_attention_at_end_f32(const float *q, size_t count, const float *k, const float *v, size_t T, size_t QH,
                             size_t KH, size_t D, float *scores, float *out);

/** Sets sums = {sum (other-reference)^2, sum reference^2, max |other-reference|} in double. */
void kvt_error_sums_f32(const float *reference, const float *other, size_t count, double sums[3]);

#ifdef __cplusplus
}
#endif

#endif /* KVTIER_KERNELS_H */
