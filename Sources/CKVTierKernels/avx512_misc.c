/* avx512_misc.c - conversions, byte shuffle and q8 with AVX-512 (+VBMI for the shuffle); impl table. */
#include "simd_x86.h"
#if defined(__x86_64__)

static KVT_AVX512_TARGET void to_f32(const uint16_t *src, size_t n, float *dst, int dtype) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, w16x16(_mm256_loadu_si256((const __m256i *)(src + i)), dtype));
    if (i < n) {
        __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(dst + i, k, w16x16(_mm256_maskz_loadu_epi16(k, src + i), dtype));
    }
}
static KVT_AVX512_TARGET void from_f32(const float *src, size_t n, uint16_t *dst, int dtype) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(dst + i), n16x16_nan(_mm512_loadu_ps(src + i), dtype));
    if (i < n) {
        __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
        _mm256_mask_storeu_epi16(dst + i, k, n16x16_nan(_mm512_maskz_loadu_ps(k, src + i), dtype));
    }
}
static KVT_AVX512_TARGET void a_f16_to_f32(const uint16_t *s, size_t n, float *d) { to_f32(s, n, d, KVT_F16); }
static KVT_AVX512_TARGET void a_bf16_to_f32(const uint16_t *s, size_t n, float *d) { to_f32(s, n, d, KVT_BF16); }
static KVT_AVX512_TARGET void a_f32_to_f16(const float *s, size_t n, uint16_t *d) { from_f32(s, n, d, KVT_F16); }
static KVT_AVX512_TARGET void a_f32_to_bf16(const float *s, size_t n, uint16_t *d) { from_f32(s, n, d, KVT_BF16); }

static KVT_AVX512_TARGET size_t a_count_nonfinite(const uint16_t *src, size_t n, uint16_t nf) {
    const __m512i e = _mm512_set1_epi16((short)nf);
    size_t c = 0, i = 0;
    for (; i + 32 <= n; i += 32)
        c += (size_t)__builtin_popcount(_mm512_cmpeq_epi16_mask(_mm512_and_si512(_mm512_loadu_si512(src + i), e), e));
    if (i < n) {
        __mmask32 k = (__mmask32)((1ull << (n - i)) - 1);
        c += (size_t)__builtin_popcount(_mm512_mask_cmpeq_epi16_mask(k, _mm512_and_si512(_mm512_maskz_loadu_epi16(k, src + i), e), e));
    }
    return c;
}

static KVT_AVX512_TARGET void a_shuffle2(const uint8_t *src, size_t n, uint8_t *dst) {
    uint8_t ie[64], io[64];
    for (int i = 0; i < 64; i++) { ie[i] = (uint8_t)(2 * i); io[i] = (uint8_t)(2 * i + 1); }
    const __m512i idx_e = _mm512_loadu_si512(ie), idx_o = _mm512_loadu_si512(io);
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m512i a = _mm512_loadu_si512(src + 2 * i), b = _mm512_loadu_si512(src + 2 * i + 64);
        _mm512_storeu_si512(dst + i, _mm512_permutex2var_epi8(a, idx_e, b));
        _mm512_storeu_si512(dst + n + i, _mm512_permutex2var_epi8(a, idx_o, b));
    }
    for (; i < n; i++) { dst[i] = src[2 * i]; dst[n + i] = src[2 * i + 1]; }
}
static KVT_AVX512_TARGET void a_unshuffle2(const uint8_t *src, size_t n, uint8_t *dst) {
    uint8_t i0[64], i1[64];
    for (int k = 0; k < 32; k++) {
        i0[2 * k] = (uint8_t)k; i0[2 * k + 1] = (uint8_t)(64 + k);
        i1[2 * k] = (uint8_t)(32 + k); i1[2 * k + 1] = (uint8_t)(96 + k);
    }
    const __m512i x0 = _mm512_loadu_si512(i0), x1 = _mm512_loadu_si512(i1);
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m512i lo = _mm512_loadu_si512(src + i), hi = _mm512_loadu_si512(src + n + i);
        _mm512_storeu_si512(dst + 2 * i, _mm512_permutex2var_epi8(lo, x0, hi));
        _mm512_storeu_si512(dst + 2 * i + 64, _mm512_permutex2var_epi8(lo, x1, hi));
    }
    for (; i < n; i++) { dst[2 * i] = src[i]; dst[2 * i + 1] = src[n + i]; }
}

/* ---------------- q8 ---------------- */

KVT_I512 __mmask32 mask32(size_t r) { return r >= 32 ? (__mmask32)~0u : (__mmask32)((1u << r) - 1); }

KVT_I512 int q8_enc(const uint16_t *src, size_t nv, size_t D, int dtype, uint8_t *dst) {
    const uint16_t nf = kvt_nf(dtype);
    const __m512i absm = _mm512_set1_epi16(0x7FFF);
    const __m512 lim = _mm512_set1_ps(127.0f), nlim = _mm512_set1_ps(-127.0f);
    for (size_t v = 0; v < nv; v++, src += D, dst += D + 2) {
        __m512i acc = _mm512_setzero_si512();
        for (size_t i = 0; i < D; i += 32)
            acc = _mm512_max_epu16(acc, _mm512_and_si512(_mm512_maskz_loadu_epi16(mask32(D - i), src + i), absm));
        uint16_t ab = hmax_epu16_512(acc);
        if (ab >= nf) return 1;
        float amax = dtype == KVT_F16 ? _cvtsh_ss(ab) : kvt_b2f(ab);
        uint16_t sb = (uint16_t)_cvtss_sh(amax / 127.0f, _MM_FROUND_TO_NEAREST_INT);
        if (kvt_h_nonfinite(sb)) return 1;
        float s = _cvtsh_ss(sb);
        const __m512 inv = _mm512_set1_ps(s > 0 ? 1.0f / s : 0.0f);
        memcpy(dst, &sb, 2);
        int8_t *q = (int8_t *)(dst + 2);
        for (size_t i = 0; i < D; i += 32) {
            __mmask32 k = mask32(D - i);
            __m512i x = _mm512_maskz_loadu_epi16(k, src + i);
            __m512 a = _mm512_mul_ps(w16x16(_mm512_castsi512_si256(x), dtype), inv);
            __m512 b = _mm512_mul_ps(w16x16(_mm512_extracti64x4_epi64(x, 1), dtype), inv);
            a = _mm512_min_ps(_mm512_max_ps(a, nlim), lim);
            b = _mm512_min_ps(_mm512_max_ps(b, nlim), lim);
            __m128i ca = _mm512_cvtepi32_epi8(_mm512_cvt_roundps_epi32(a, KVT_RNE));
            __m128i cb = _mm512_cvtepi32_epi8(_mm512_cvt_roundps_epi32(b, KVT_RNE));
            _mm256_mask_storeu_epi8(q + i, k, _mm256_set_m128i(cb, ca));
        }
    }
    return 0;
}

static KVT_AVX512_TARGET size_t a_q8_encode(const uint16_t *src, size_t T, size_t H, size_t D, int dtype,
                                            uint8_t *dst) {
    int bad = dtype == KVT_F16 ? q8_enc(src, T * H, D, KVT_F16, dst) : q8_enc(src, T * H, D, KVT_BF16, dst);
    if (!bad) return 0;
    size_t f = kvt_fail_q8(src, T, H, D, dtype);
    return f ? f : 1;
}

KVT_I512 int q8_dec(const uint8_t *src, size_t nv, size_t D, int dtype, uint16_t *dst) {
    for (size_t v = 0; v < nv; v++, src += D + 2, dst += D) {
        uint16_t sb = kvt_le16(src);
        if (kvt_bad_scale(sb)) return 1;
        const __m512 s = _mm512_set1_ps(_cvtsh_ss(sb));
        const int8_t *q = (const int8_t *)(src + 2);
        for (size_t i = 0; i < D; i += 32) {
            __mmask32 k = mask32(D - i);
            __m256i c = _mm256_maskz_loadu_epi8(k, q + i);
            __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(c))), s);
            __m512 b = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(c, 1))), s);
            __m512i r = _mm512_inserti64x4(_mm512_castsi256_si512(n16x16(a, dtype)), n16x16(b, dtype), 1);
            _mm512_mask_storeu_epi16(dst + i, k, r);
        }
    }
    return 0;
}

static KVT_AVX512_TARGET int a_q8_decode(const uint8_t *src, size_t T, size_t H, size_t D, int dtype, uint16_t *dst) {
    return dtype == KVT_F16 ? q8_dec(src, T * H, D, KVT_F16, dst) : q8_dec(src, T * H, D, KVT_BF16, dst);
}

size_t kvt_a512_k4v4_encode_keys(const uint16_t *, size_t, size_t, size_t, int, uint8_t *);
int kvt_a512_k4v4_decode_keys(const uint8_t *, size_t, size_t, size_t, int, uint16_t *);
size_t kvt_a512_k4v4_encode_values(const uint16_t *, size_t, size_t, size_t, int, uint8_t *);
int kvt_a512_k4v4_decode_values(const uint8_t *, size_t, size_t, size_t, int, uint16_t *);
size_t kvt_tq_encode_avx512(const void *, size_t, size_t, int, int, const uint8_t *, size_t, uint8_t *);
int kvt_tq_decode_avx512(const uint8_t *, size_t, size_t, int, int, const uint8_t *, size_t, void *);
size_t kvt_tq_means_avx512(const uint16_t *, size_t, size_t, size_t, int, uint8_t *);

const kvt_impl kvt_impl_avx512 = {
    a_f16_to_f32, a_f32_to_f16, a_bf16_to_f32, a_f32_to_bf16, a_count_nonfinite,
    a_shuffle2, a_unshuffle2,
    a_q8_encode, a_q8_decode,
    kvt_a512_k4v4_encode_keys, kvt_a512_k4v4_decode_keys, kvt_a512_k4v4_encode_values, kvt_a512_k4v4_decode_values,
    kvt_tq_encode_avx512, kvt_tq_decode_avx512, kvt_tq_means_avx512,
};
#endif
