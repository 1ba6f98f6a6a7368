/* simd_x86.h - private inline helpers for the AVX2 and AVX-512 kernels (x86_64 only). */
#ifndef KVT_SIMD_X86_H
#define KVT_SIMD_X86_H
#if defined(__x86_64__)
#include "internal.h"
#include <immintrin.h>

#define KVT_RNE (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define KVT_I512 static inline __attribute__((always_inline)) KVT_AVX512_TARGET
#define KVT_I256 static inline __attribute__((always_inline)) KVT_AVX2_TARGET

/* ---------------- AVX-512 ---------------- */

/* 16 elements (fp16 or bf16 bits) -> 16 floats, exact. */
KVT_I512 __m512 w16x16(__m256i h, int dtype) {
    if (dtype == KVT_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
/* 16 finite floats -> 16 elements, round to nearest even (no NaN handling). */
KVT_I512 __m256i n16x16(__m512 f, int dtype) {
    if (dtype == KVT_F16) return _mm512_cvtps_ph(f, KVT_RNE);
    __m512i x = _mm512_castps_si512(f);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7FFF)), odd);
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}
/* Same, with NaN kept (quieted) for bf16. */
KVT_I512 __m256i n16x16_nan(__m512 f, int dtype) {
    if (dtype == KVT_F16) return _mm512_cvtps_ph(f, KVT_RNE);
    __m512i x = _mm512_castps_si512(f);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7FFF)), odd), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(x, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
}
/* Unsigned total-order key of 32 sign-magnitude halves: -0 < +0. Self-inverse up to the top bit. */
KVT_I512 __m512i ukey512(__m512i x) {
    return _mm512_xor_si512(x, _mm512_or_si512(_mm512_srai_epi16(x, 15), _mm512_set1_epi16((short)0x8000)));
}
/* Signed total-order key (involution). */
KVT_I512 __m512i skey512(__m512i x) {
    return _mm512_xor_si512(x, _mm512_and_si512(_mm512_srai_epi16(x, 15), _mm512_set1_epi16(0x7FFF)));
}
KVT_I512 uint16_t hmin_epu16_512(__m512i u) {
    __m256i a = _mm256_min_epu16(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
    __m128i b = _mm_min_epu16(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    return (uint16_t)_mm_cvtsi128_si32(_mm_minpos_epu16(b));
}
KVT_I512 uint16_t hmax_epu16_512(__m512i u) {
    __m256i a = _mm256_max_epu16(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
    __m128i b = _mm_max_epu16(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    b = _mm_xor_si128(b, _mm_set1_epi32(-1));
    return (uint16_t)~_mm_cvtsi128_si32(_mm_minpos_epu16(b));
}
/* Inverse of the unsigned key for one value. */
KVT_INLINE uint16_t unukey(uint16_t u) { return (uint16_t)((u & 0x8000u) ? (u ^ 0x8000u) : (uint16_t)~u); }

/* ---------------- AVX2 ---------------- */

KVT_I256 __m256 w8(__m128i h, int dtype) {
    if (dtype == KVT_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
KVT_I256 __m128i n8(__m256 f, int dtype) {
    if (dtype == KVT_F16) return _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT);
    __m256i x = _mm256_castps_si256(f);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7FFF)), odd), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
KVT_I256 __m128i n8_nan(__m256 f, int dtype) {
    if (dtype == KVT_F16) return _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT);
    __m256i x = _mm256_castps_si256(f);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7FFF)), odd), 16);
    __m256i q = _mm256_or_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x40));
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, q, nan);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
KVT_I256 __m256i ukey256(__m256i x) {
    return _mm256_xor_si256(x, _mm256_or_si256(_mm256_srai_epi16(x, 15), _mm256_set1_epi16((short)0x8000)));
}
KVT_I256 __m256i skey256(__m256i x) {
    return _mm256_xor_si256(x, _mm256_and_si256(_mm256_srai_epi16(x, 15), _mm256_set1_epi16(0x7FFF)));
}
KVT_I256 uint16_t hmin_epu16_256(__m256i a) {
    __m128i b = _mm_min_epu16(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    return (uint16_t)_mm_cvtsi128_si32(_mm_minpos_epu16(b));
}
KVT_I256 uint16_t hmax_epu16_256(__m256i a) {
    __m128i b = _mm_max_epu16(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    b = _mm_xor_si128(b, _mm_set1_epi32(-1));
    return (uint16_t)~_mm_cvtsi128_si32(_mm_minpos_epu16(b));
}

/* tq FWHT pieces (spec stage order). In-register stages: partner lanes by permute, then
 * fma(own, +-1, partner), which is exactly the rounded own + partner or partner - own.
 * Stages len 1..32 of one 64-element chunk held in n8 <= 8 ymm: */
KVT_I256 void fwht_chunk(__m256 *y, int n8) {
    const __m256 p1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
    const __m256 p2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
    const __m256 p4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
    for (int r = 0; r < n8; r++) {
        __m256 v = y[r];
        v = _mm256_fmadd_ps(v, p1, _mm256_permute_ps(v, 0xB1));
        v = _mm256_fmadd_ps(v, p2, _mm256_permute_ps(v, 0x4E));
        y[r] = _mm256_fmadd_ps(v, p4, _mm256_permute2f128_ps(v, v, 1));
    }
    for (int len = 1; len < n8; len <<= 1)
        for (int r = 0; r < n8; r++)
            if (!(r & len)) {
                __m256 a = y[r], b = y[r + len];
                y[r] = _mm256_add_ps(a, b);
                y[r + len] = _mm256_sub_ps(a, b);
            }
}

/* Stages len = 64 .. D/4 on buf (the last stage, len = D/2, is left to the caller). */
KVT_I256 void fwht_mid(float *buf, int D) {
    for (int len = 64; len < D / 2; len <<= 1)
        for (int j0 = 0; j0 < D; j0 += 2 * len)
            for (int j = j0; j < j0 + len; j += 8) {
                __m256 a = _mm256_load_ps(buf + j), b = _mm256_load_ps(buf + j + len);
                _mm256_store_ps(buf + j, _mm256_add_ps(a, b));
                _mm256_store_ps(buf + j + len, _mm256_sub_ps(a, b));
            }
}

#endif
#endif
