/* avx2_tq_dec.c - tq / tqm decode for AVX2 (+FMA, F16C).
 *
 * Codes are widened to int32 lanes and looked up in alpha * levels with vpermps (two tables and
 * a blend on bit 3 for 16 levels); the FWHT is the one of avx2_tq.c (spec stage order), and the
 * last stage is fused with sign/D, the tqm mean and the conversion to the element type.
 */
#include "simd_x86.h"
#if defined(__x86_64__)

#define I256 KVT_I256

/* alpha * L[c] for 8 codes; lo/hi = alpha * levr[0..7] / [8..15]. Reads index bits 0..3 only. */
I256 __m256 look(__m256i c, __m256 lo, __m256 hi, int bits) {
    __m256 a = _mm256_permutevar8x32_ps(lo, c);
    if (bits < 4) return a; /* levr repeats the 4 or 8 levels: bits above are ignored */
    __m256 b = _mm256_permutevar8x32_ps(hi, c);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
}

/* Levels of one block of 32 codes into y[0..3] (elements 0..7, 8..15, 16..23, 24..31). */
I256 const uint8_t *unpack32(const uint8_t *in, int bits, __m256 lo, __m256 hi, __m256 *y) {
    if (bits == 4) {
        __m128i q = _mm_loadu_si128((const __m128i *)in);
        __m256i v0 = _mm256_cvtepu8_epi32(q), v1 = _mm256_cvtepu8_epi32(_mm_srli_si128(q, 8));
        y[0] = look(v0, lo, hi, 4);
        y[1] = look(v1, lo, hi, 4);
        y[2] = look(_mm256_srli_epi32(v0, 4), lo, hi, 4);
        y[3] = look(_mm256_srli_epi32(v1, 4), lo, hi, 4);
        return in + 16;
    }
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)in));
    if (bits == 2) {
        for (int k = 0; k < 4; k++) y[k] = look(_mm256_srli_epi32(v, 2 * k), lo, hi, 2);
        return in + 8;
    }
    uint32_t hb;
    memcpy(&hb, in + 8, 4);
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i three = _mm256_set1_epi32(3), four = _mm256_set1_epi32(4);
    for (int k = 0; k < 4; k++) {
        __m256i h = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)(hb >> (8 * k))), bit), bit);
        __m256i c = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(v, 2 * k), three), _mm256_and_si256(h, four));
        y[k] = look(c, lo, hi, 3);
    }
    return in + 12;
}

/* x = y * sign/D (+ mean), stored as dtype (0 = float32) at element i of dst. */
I256 void put8(__m256 y, const float *sd, const uint8_t *mean, int dtype, void *dst, int i) {
    __m256 x = _mm256_mul_ps(y, _mm256_loadu_ps(sd + i));
    if (mean) x = _mm256_add_ps(x, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mean + 2 * i))));
    if (dtype == 0) _mm256_storeu_ps((float *)dst + i, x);
    else _mm_storeu_si128((__m128i *)((uint16_t *)dst + i), n8(x, dtype));
}

I256 int dec_vec(const kvt_tq_tables *tb, const uint8_t *in, int D, int bits, int dtype, const uint8_t *mean,
                 void *dst) {
    uint16_t ab = kvt_le16(in);
    if (kvt_h_nonfinite(ab)) return 1;
    __m256 va = _mm256_set1_ps(_cvtsh_ss(ab));
    __m256 lo = _mm256_mul_ps(va, _mm256_loadu_ps(tb->levr[bits - 2]));
    __m256 hi = _mm256_mul_ps(va, _mm256_loadu_ps(tb->levr[bits - 2] + 8));
    const float *sd = tb->signd[D == 32 ? 0 : D == 64 ? 1 : D == 128 ? 2 : 3];
    in += 2;
    if (D <= 64) {
        __m256 y[8];
        for (int b = 0; b < D / 32; b++) in = unpack32(in, bits, lo, hi, y + 4 * b);
        fwht_chunk(y, D / 8);
        for (int r = 0; r < D / 8; r++) put8(y[r], sd, mean, dtype, dst, 8 * r);
        return 0;
    }
    float buf[256] __attribute__((aligned(32)));
    for (int c = 0; c < D; c += 64) {
        __m256 y[8];
        in = unpack32(in, bits, lo, hi, y);
        in = unpack32(in, bits, lo, hi, y + 4);
        fwht_chunk(y, 8);
        for (int r = 0; r < 8; r++) _mm256_store_ps(buf + c + 8 * r, y[r]);
    }
    fwht_mid(buf, D);
    for (int j = 0; j < D / 2; j += 8) {
        __m256 a = _mm256_load_ps(buf + j), b = _mm256_load_ps(buf + j + D / 2);
        put8(_mm256_add_ps(a, b), sd, mean, dtype, dst, j);
        put8(_mm256_sub_ps(a, b), sd, mean, dtype, dst, j + D / 2);
    }
    return 0;
}

I256 int dec_part(const uint8_t *src, size_t vectors, int D, int bits, int dtype, const uint8_t *mean, size_t H,
                  void *dst) {
    const kvt_tq_tables *tb = kvt_tq_get_tables();
    size_t vs = 2 + (size_t)D * (size_t)bits / 8, es = dtype == 0 ? 4 : 2, h = 0;
    uint8_t *d = dst;
    for (size_t v = 0; v < vectors; v++, src += vs, d += (size_t)D * es) {
        if (dec_vec(tb, src, D, bits, dtype, mean ? mean + 2 * h * (size_t)D : NULL, d)) return 1;
        if (++h == H) h = 0;
    }
    return 0;
}

#define A2_DEC_DT(D, B)                                                           \
    switch (dtype) {                                                              \
    case KVT_F16: return dec_part(src, vectors, D, B, KVT_F16, mean, H, dst);     \
    case KVT_BF16: return dec_part(src, vectors, D, B, KVT_BF16, mean, H, dst);   \
    default: return dec_part(src, vectors, D, B, 0, mean, H, dst);                \
    }
#define A2_DEC_BITS(D)                                                            \
    switch (bits) {                                                               \
    case 2: A2_DEC_DT(D, 2)                                                       \
    case 3: A2_DEC_DT(D, 3)                                                       \
    default: A2_DEC_DT(D, 4)                                                      \
    }

KVT_AVX2_TARGET int kvt_tq_decode_avx2(const uint8_t *src, size_t vectors, size_t D, int bits, int dtype,
                                       const uint8_t *mean, size_t H, void *dst) {
    switch (D) {
    case 32: A2_DEC_BITS(32)
    case 64: A2_DEC_BITS(64)
    case 128: A2_DEC_BITS(128)
    default: A2_DEC_BITS(256)
    }
}

#endif
