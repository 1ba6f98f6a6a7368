/* avx2_misc.c - conversions, byte shuffle and q8 with AVX2 + F16C; impl table. Tails use the scalar helpers. */
#include "simd_x86.h"
#if defined(__x86_64__)

static KVT_AVX2_TARGET void to_f32(const uint16_t *src, size_t n, float *dst, int dtype) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, w8(_mm_loadu_si128((const __m128i *)(src + i)), dtype));
    for (; i < n; i++) kvt_stf(dst + i, kvt_widen(kvt_ld16(src + i), dtype));
}
static KVT_AVX2_TARGET void from_f32(const float *src, size_t n, uint16_t *dst, int dtype) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm_storeu_si128((__m128i *)(dst + i), n8_nan(_mm256_loadu_ps(src + i), dtype));
    for (; i < n; i++) kvt_st16(dst + i, kvt_narrow(kvt_ldf(src + i), dtype));
}
static KVT_AVX2_TARGET void b_f16_to_f32(const uint16_t *s, size_t n, float *d) { to_f32(s, n, d, KVT_F16); }
static KVT_AVX2_TARGET void b_bf16_to_f32(const uint16_t *s, size_t n, float *d) { to_f32(s, n, d, KVT_BF16); }
static KVT_AVX2_TARGET void b_f32_to_f16(const float *s, size_t n, uint16_t *d) { from_f32(s, n, d, KVT_F16); }
static KVT_AVX2_TARGET void b_f32_to_bf16(const float *s, size_t n, uint16_t *d) { from_f32(s, n, d, KVT_BF16); }

static KVT_AVX2_TARGET size_t b_count_nonfinite(const uint16_t *src, size_t n, uint16_t nf) {
    const __m256i e = _mm256_set1_epi16((short)nf);
    size_t c = 0, i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i x = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(src + i)), e);
        c += (size_t)__builtin_popcount((unsigned)_mm256_movemask_epi8(_mm256_cmpeq_epi16(x, e))) / 2;
    }
    for (; i < n; i++) c += (kvt_ld16(src + i) & nf) == nf;
    return c;
}

static KVT_AVX2_TARGET void b_shuffle2(const uint8_t *src, size_t n, uint8_t *dst) {
    const __m256i sh = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(src + 2 * i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(src + 2 * i + 32));
        a = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(a, sh), 0xD8); /* lo0-15 | hi0-15 */
        b = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(b, sh), 0xD8);
        _mm256_storeu_si256((__m256i *)(dst + i), _mm256_permute2x128_si256(a, b, 0x20));
        _mm256_storeu_si256((__m256i *)(dst + n + i), _mm256_permute2x128_si256(a, b, 0x31));
    }
    for (; i < n; i++) { dst[i] = src[2 * i]; dst[n + i] = src[2 * i + 1]; }
}
static KVT_AVX2_TARGET void b_unshuffle2(const uint8_t *src, size_t n, uint8_t *dst) {
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i lo = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i hi = _mm256_loadu_si256((const __m256i *)(src + n + i));
        __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi);
        _mm256_storeu_si256((__m256i *)(dst + 2 * i), _mm256_permute2x128_si256(a, b, 0x20));
        _mm256_storeu_si256((__m256i *)(dst + 2 * i + 32), _mm256_permute2x128_si256(a, b, 0x31));
    }
    for (; i < n; i++) { dst[2 * i] = src[i]; dst[2 * i + 1] = src[n + i]; }
}

/* ---------------- q8 ---------------- */

KVT_I256 __m256i q8_code(__m256 x, __m256 inv) {
    __m256 y = _mm256_mul_ps(x, inv);
    y = _mm256_min_ps(_mm256_max_ps(y, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
    return _mm256_cvtps_epi32(y);
}

KVT_I256 int q8_enc(const uint16_t *src, size_t nv, size_t D, int dtype, uint8_t *dst) {
    const uint16_t nf = kvt_nf(dtype);
    const __m256i absm = _mm256_set1_epi16(0x7FFF), perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (size_t v = 0; v < nv; v++, src += D, dst += D + 2) {
        __m256i acc = _mm256_setzero_si256();
        size_t i = 0;
        for (; i + 16 <= D; i += 16)
            acc = _mm256_max_epu16(acc, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(src + i)), absm));
        uint16_t ab = hmax_epu16_256(acc);
        for (; i < D; i++) {
            uint16_t a = kvt_ld16(src + i) & 0x7FFFu;
            ab = a > ab ? a : ab;
        }
        if (ab >= nf) return 1;
        float amax = dtype == KVT_F16 ? _cvtsh_ss(ab) : kvt_b2f(ab);
        uint16_t sb = (uint16_t)_cvtss_sh(amax / 127.0f, _MM_FROUND_TO_NEAREST_INT);
        if (kvt_h_nonfinite(sb)) return 1;
        float s = _cvtsh_ss(sb), invs = s > 0 ? 1.0f / s : 0.0f;
        const __m256 inv = _mm256_set1_ps(invs);
        memcpy(dst, &sb, 2);
        int8_t *q = (int8_t *)(dst + 2);
        for (i = 0; i + 32 <= D; i += 32) {
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(src + i));
            __m256i x1 = _mm256_loadu_si256((const __m256i *)(src + i + 16));
            __m256i c0 = q8_code(w8(_mm256_castsi256_si128(x0), dtype), inv);
            __m256i c1 = q8_code(w8(_mm256_extracti128_si256(x0, 1), dtype), inv);
            __m256i c2 = q8_code(w8(_mm256_castsi256_si128(x1), dtype), inv);
            __m256i c3 = q8_code(w8(_mm256_extracti128_si256(x1, 1), dtype), inv);
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(c0, c1), _mm256_packs_epi32(c2, c3));
            _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(p, perm));
        }
        for (; i < D; i++) {
            float y = kvt_widen(kvt_ld16(src + i), dtype) * invs;
            y = y < -127.0f ? -127.0f : (y > 127.0f ? 127.0f : y);
            q[i] = (int8_t)kvt_rne(y);
        }
    }
    return 0;
}

static KVT_AVX2_TARGET size_t b_q8_encode(const uint16_t *src, size_t T, size_t H, size_t D, int dtype, uint8_t *dst) {
    int bad = dtype == KVT_F16 ? q8_enc(src, T * H, D, KVT_F16, dst) : q8_enc(src, T * H, D, KVT_BF16, dst);
    if (!bad) return 0;
    size_t f = kvt_fail_q8(src, T, H, D, dtype);
    return f ? f : 1;
}

KVT_I256 int q8_dec(const uint8_t *src, size_t nv, size_t D, int dtype, uint16_t *dst) {
    for (size_t v = 0; v < nv; v++, src += D + 2, dst += D) {
        uint16_t sb = kvt_le16(src);
        if (kvt_bad_scale(sb)) return 1;
        float sf = _cvtsh_ss(sb);
        const __m256 s = _mm256_set1_ps(sf);
        const int8_t *q = (const int8_t *)(src + 2);
        size_t i = 0;
        for (; i + 16 <= D; i += 16) {
            __m128i c = _mm_loadu_si128((const __m128i *)(q + i));
            __m256 a = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)), s);
            __m256 b = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c, 8))), s);
            _mm256_storeu_si256((__m256i *)(dst + i), _mm256_set_m128i(n8(b, dtype), n8(a, dtype)));
        }
        for (; i < D; i++) kvt_st16(dst + i, kvt_narrow((float)q[i] * sf, dtype));
    }
    return 0;
}

static KVT_AVX2_TARGET int b_q8_decode(const uint8_t *src, size_t T, size_t H, size_t D, int dtype, uint16_t *dst) {
    return dtype == KVT_F16 ? q8_dec(src, T * H, D, KVT_F16, dst) : q8_dec(src, T * H, D, KVT_BF16, dst);
}

size_t kvt_a2_k4v4_encode_keys(const uint16_t *, size_t, size_t, size_t, int, uint8_t *);
int kvt_a2_k4v4_decode_keys(const uint8_t *, size_t, size_t, size_t, int, uint16_t *);
size_t kvt_a2_k4v4_encode_values(const uint16_t *, size_t, size_t, size_t, int, uint8_t *);
int kvt_a2_k4v4_decode_values(const uint8_t *, size_t, size_t, size_t, int, uint16_t *);
size_t kvt_tq_encode_avx2(const void *, size_t, size_t, int, int, const uint8_t *, size_t, uint8_t *);
int kvt_tq_decode_avx2(const uint8_t *, size_t, size_t, int, int, const uint8_t *, size_t, void *);
size_t kvt_tq_means_avx2(const uint16_t *, size_t, size_t, size_t, int, uint8_t *);

const kvt_impl kvt_impl_avx2 = {
    b_f16_to_f32, b_f32_to_f16, b_bf16_to_f32, b_f32_to_bf16, b_count_nonfinite,
    b_shuffle2, b_unshuffle2,
    b_q8_encode, b_q8_decode,
    kvt_a2_k4v4_encode_keys, kvt_a2_k4v4_decode_keys, kvt_a2_k4v4_encode_values, kvt_a2_k4v4_decode_values,
    kvt_tq_encode_avx2, kvt_tq_decode_avx2, kvt_tq_means_avx2,
};
#endif
