/* avx512_k4v4.c - k4v4 encode/decode, AVX-512 (F/BW/VL/DQ) + F16C + FMA. */
#include "simd_x86.h"
#if defined(__x86_64__)

/* ---------------- values ---------------- */

KVT_I512 size_t enc_values(const uint16_t *src, size_t nblk, int dtype, uint8_t *dst) {
    const uint16_t nf = kvt_nf(dtype);
    const __m512 zero = _mm512_setzero_ps(), fifteen = _mm512_set1_ps(15.0f);
    for (size_t i = 0; i < nblk; i++, src += 32, dst += 20) {
        __m512i x = _mm512_loadu_si512(src);
        __m512i u = ukey512(x);
        uint16_t ulo = hmin_epu16_512(u), uhi = hmax_epu16_512(u);
        if (uhi >= (0x8000u | nf) || ulo <= 0x7FFFu - nf) return 1;
        uint16_t lob = unukey(ulo), hib = unukey(uhi);
        float lo = dtype == KVT_F16 ? _cvtsh_ss(lob) : kvt_b2f(lob);
        float hi = dtype == KVT_F16 ? _cvtsh_ss(hib) : kvt_b2f(hib);
        uint16_t mb = dtype == KVT_F16 ? lob : (uint16_t)_cvtss_sh(lo, _MM_FROUND_TO_NEAREST_INT);
        uint16_t sb = (uint16_t)_cvtss_sh((hi - lo) / 15.0f, _MM_FROUND_TO_NEAREST_INT);
        if (dtype != KVT_F16 && (kvt_h_nonfinite(mb) || kvt_h_nonfinite(sb))) return 1;
        float s = _cvtsh_ss(sb);
        __m512 m = _mm512_set1_ps(_cvtsh_ss(mb)), inv = _mm512_set1_ps(s > 0 ? 1.0f / s : 0.0f);
        uint32_t hdr = (uint32_t)mb | (uint32_t)sb << 16;
        memcpy(dst, &hdr, 4);
        __m512 a = w16x16(_mm512_castsi512_si256(x), dtype), b = w16x16(_mm512_extracti64x4_epi64(x, 1), dtype);
        a = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(a, m), inv), zero), fifteen);
        b = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(b, m), inv), zero), fifteen);
        __m512i ca = _mm512_cvt_roundps_epi32(a, KVT_RNE), cb = _mm512_cvt_roundps_epi32(b, KVT_RNE);
        _mm_storeu_si128((__m128i *)(dst + 4), _mm512_cvtepi32_epi8(_mm512_or_si512(ca, _mm512_slli_epi32(cb, 4))));
    }
    return 0;
}

static KVT_AVX512_TARGET size_t a512_k4v4_encode_values(const uint16_t *src, size_t T, size_t H, size_t D,
                                                        int dtype, uint8_t *dst) {
    size_t nblk = T * H * D / 32;
    size_t bad = dtype == KVT_F16 ? enc_values(src, nblk, KVT_F16, dst) : enc_values(src, nblk, KVT_BF16, dst);
    if (!bad) return 0;
    size_t f = kvt_fail_k4v4_values(src, T, H, D, dtype);
    return f ? f : 1;
}

KVT_I512 int dec_values(const uint8_t *src, size_t nblk, int dtype, uint16_t *dst) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m128i m0f = _mm_set1_epi8(0x0F);
    uint32_t bad = 0;
    for (size_t i = 0; i < nblk; i++, src += 20, dst += 32) {
        uint32_t ms;
        memcpy(&ms, src, 4);
        /* min NaN/Inf, or scale NaN/Inf/negative (nonzero with sign bit) */
        bad |= ((ms & 0x7C00u) == 0x7C00u) | ((ms & 0x7C000000u) == 0x7C000000u) | ((ms >> 16) > 0x8000u);
        __m128 hv = _mm_cvtph_ps(_mm_cvtsi32_si128((int)ms));
        __m512 m = _mm512_broadcastss_ps(hv), s = _mm512_broadcastss_ps(_mm_movehdup_ps(hv));
        __m512i lut = _mm512_castsi256_si512(n16x16(_mm512_fmadd_ps(iota, s, m), dtype));
        __m128i q = _mm_loadu_si128((const __m128i *)(src + 4));
        __m128i lo = _mm_and_si128(q, m0f), hi = _mm_and_si128(_mm_srli_epi16(q, 4), m0f);
        __m512i idx = _mm512_cvtepu8_epi16(_mm256_set_m128i(hi, lo));
        _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(idx, lut));
    }
    return bad != 0;
}

static KVT_AVX512_TARGET int a512_k4v4_decode_values(const uint8_t *src, size_t T, size_t H, size_t D, int dtype,
                                                     uint16_t *dst) {
    size_t nblk = T * H * D / 32;
    return dtype == KVT_F16 ? dec_values(src, nblk, KVT_F16, dst) : dec_values(src, nblk, KVT_BF16, dst);
}

/* ---------------- keys ---------------- */

/* One token group, one head, NB consecutive 32-channel blocks: min/max over the group's tokens,
 * header, codes. in/out strides are HD elements / HD/2 bytes per token. Returns 1 on failure. */
KVT_I512 int enc_keys_chunk(const uint16_t *in, size_t nt, size_t HD, int NB, int dtype, uint8_t *mins,
                            uint8_t *scales, uint8_t *codes) {
    const uint16_t nf = kvt_nf(dtype);
    __m512i kmin[4], kmax[4];
    for (int j = 0; j < NB; j++) { kmin[j] = _mm512_set1_epi16(0x7FFF); kmax[j] = _mm512_set1_epi16((short)0x8000); }
    for (size_t t = 0; t < nt; t++)
        for (int j = 0; j < NB; j++) {
            __m512i k = skey512(_mm512_loadu_si512(in + t * HD + 32 * j));
            kmin[j] = _mm512_min_epi16(kmin[j], k);
            kmax[j] = _mm512_max_epi16(kmax[j], k);
        }
    __mmask32 badm = 0;
    for (int j = 0; j < NB; j++)
        badm |= _mm512_cmpgt_epi16_mask(kmax[j], _mm512_set1_epi16((short)(nf - 1))) |
                _mm512_cmplt_epi16_mask(kmin[j], _mm512_set1_epi16((short)-nf));
    if (badm) return 1;
    __m512 m[4][2], inv[4][2];
    const __m512 one = _mm512_set1_ps(1.0f), c15 = _mm512_set1_ps(15.0f), zero = _mm512_setzero_ps();
    const __m512i expo = _mm512_set1_epi16(0x7C00);
    for (int j = 0; j < NB; j++) {
        __m512i lob = skey512(kmin[j]), hib = skey512(kmax[j]);
        __m512 lo0 = w16x16(_mm512_castsi512_si256(lob), dtype), lo1 = w16x16(_mm512_extracti64x4_epi64(lob, 1), dtype);
        __m512 hi0 = w16x16(_mm512_castsi512_si256(hib), dtype), hi1 = w16x16(_mm512_extracti64x4_epi64(hib, 1), dtype);
        __m512i mh = dtype == KVT_F16 ? lob
                     : _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtps_ph(lo0, KVT_RNE)), _mm512_cvtps_ph(lo1, KVT_RNE), 1);
        __m512i sh = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm512_cvtps_ph(_mm512_div_ps(_mm512_sub_ps(hi0, lo0), c15), KVT_RNE)),
            _mm512_cvtps_ph(_mm512_div_ps(_mm512_sub_ps(hi1, lo1), c15), KVT_RNE), 1);
        if (dtype != KVT_F16 && (_mm512_cmpeq_epi16_mask(_mm512_and_si512(mh, expo), expo) |
                                 _mm512_cmpeq_epi16_mask(_mm512_and_si512(sh, expo), expo)))
            return 1;
        _mm512_storeu_si512(mins + 64 * j, mh);
        _mm512_storeu_si512(scales + 64 * j, sh);
        for (int k = 0; k < 2; k++) {
            __m256i mk = k ? _mm512_extracti64x4_epi64(mh, 1) : _mm512_castsi512_si256(mh);
            __m256i sk = k ? _mm512_extracti64x4_epi64(sh, 1) : _mm512_castsi512_si256(sh);
            __m512 sf = _mm512_cvtph_ps(sk);
            m[j][k] = _mm512_cvtph_ps(mk);
            inv[j][k] = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(sf, zero, _CMP_GT_OQ), one, sf);
        }
    }
    for (size_t t = 0; t < nt; t++)
        for (int j = 0; j < NB; j++) {
            __m512i x = _mm512_loadu_si512(in + t * HD + 32 * j);
            __m512 a = w16x16(_mm512_castsi512_si256(x), dtype), b = w16x16(_mm512_extracti64x4_epi64(x, 1), dtype);
            a = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(a, m[j][0]), inv[j][0]), zero), c15);
            b = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(b, m[j][1]), inv[j][1]), zero), c15);
            __m512i ca = _mm512_cvt_roundps_epi32(a, KVT_RNE), cb = _mm512_cvt_roundps_epi32(b, KVT_RNE);
            _mm_storeu_si128((__m128i *)(codes + t * (HD / 2) + 16 * j),
                             _mm512_cvtepi32_epi8(_mm512_or_si512(ca, _mm512_slli_epi32(cb, 4))));
        }
    return 0;
}

KVT_I512 int enc_keys(const uint16_t *src, size_t T, size_t H, size_t D, int dtype, uint8_t *dst) {
    size_t HD = H * D, nbD = D / 32;
    for (size_t t0 = 0; t0 < T; t0 += 32) {
        size_t nt = T - t0 < 32 ? T - t0 : 32;
        const uint16_t *g = src + t0 * HD;
        uint8_t *mins = dst, *scales = dst + 2 * HD, *codes = dst + 4 * HD;
        for (size_t h = 0; h < H; h++)
            for (size_t b0 = 0; b0 < nbD; b0 += 4) {
                size_t c = h * D + 32 * b0, r = nbD - b0;
                const uint16_t *in = g + c;
                int bad;
                if (r >= 4) bad = enc_keys_chunk(in, nt, HD, 4, dtype, mins + 2 * c, scales + 2 * c, codes + c / 2);
                else if (r == 3) bad = enc_keys_chunk(in, nt, HD, 3, dtype, mins + 2 * c, scales + 2 * c, codes + c / 2);
                else if (r == 2) bad = enc_keys_chunk(in, nt, HD, 2, dtype, mins + 2 * c, scales + 2 * c, codes + c / 2);
                else bad = enc_keys_chunk(in, nt, HD, 1, dtype, mins + 2 * c, scales + 2 * c, codes + c / 2);
                if (bad) return 1;
            }
        dst += 4 * HD + nt * HD / 2;
    }
    return 0;
}

static KVT_AVX512_TARGET size_t a512_k4v4_encode_keys(const uint16_t *src, size_t T, size_t H, size_t D, int dtype,
                                                      uint8_t *dst) {
    int bad = dtype == KVT_F16 ? enc_keys(src, T, H, D, KVT_F16, dst) : enc_keys(src, T, H, D, KVT_BF16, dst);
    if (!bad) return 0;
    size_t f = kvt_fail_k4v4_keys(src, T, H, D, dtype);
    return f ? f : 1;
}

/* Decode one token group for channels [c0, c0 + nc) (nc % 32 == 0, nc <= 1024): the chunk's
 * scales/mins are widened once into an L1-resident stack table, then tokens are written in
 * order so the stores stream sequentially. */
#define KVT_KEYS_CHUNK 1024
KVT_I512 void dec_keys_chunk(const uint8_t *mins, const uint8_t *scales, const uint8_t *codes, size_t nt,
                             size_t HD, size_t nc, int dtype, uint16_t *out) {
    float mf[KVT_KEYS_CHUNK] __attribute__((aligned(64))), sf[KVT_KEYS_CHUNK] __attribute__((aligned(64)));
    for (size_t c = 0; c < nc; c += 16) {
        _mm512_store_ps(mf + c, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mins + 2 * c))));
        _mm512_store_ps(sf + c, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + 2 * c))));
    }
    const __m128i m0f = _mm_set1_epi8(0x0F);
    for (size_t t = 0; t < nt; t++) {
        const uint8_t *q = codes + t * (HD / 2);
        uint16_t *o = out + t * HD;
        for (size_t c = 0; c < nc; c += 32) {
            __m128i qq = _mm_loadu_si128((const __m128i *)(q + c / 2));
            __m128i lo = _mm_and_si128(qq, m0f), hi = _mm_and_si128(_mm_srli_epi16(qq, 4), m0f);
            __m512 a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), _mm512_load_ps(sf + c), _mm512_load_ps(mf + c));
            __m512 b = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), _mm512_load_ps(sf + c + 16), _mm512_load_ps(mf + c + 16));
            __m512i r = _mm512_inserti64x4(_mm512_castsi256_si512(n16x16(a, dtype)), n16x16(b, dtype), 1);
            _mm512_storeu_si512(o + c, r);
        }
    }
}

/* Validate n fp16 mins and scales (n % 32 == 0). */
KVT_I512 int header_bad(const uint8_t *mins, const uint8_t *scales, size_t n) {
    const __m512i expo = _mm512_set1_epi16(0x7C00), s8000 = _mm512_set1_epi16((short)0x8000);
    __mmask32 bad = 0;
    for (size_t i = 0; i < n; i += 32) {
        __m512i mv = _mm512_loadu_si512(mins + 2 * i), sv = _mm512_loadu_si512(scales + 2 * i);
        bad |= _mm512_cmpeq_epi16_mask(_mm512_and_si512(mv, expo), expo) |
               _mm512_cmpeq_epi16_mask(_mm512_and_si512(sv, expo), expo) | _mm512_cmpgt_epu16_mask(sv, s8000);
    }
    return bad != 0;
}

KVT_I512 int dec_keys(const uint8_t *src, size_t T, size_t H, size_t D, int dtype, uint16_t *dst) {
    size_t HD = H * D;
    for (size_t t0 = 0; t0 < T; t0 += 32) {
        size_t nt = T - t0 < 32 ? T - t0 : 32;
        const uint8_t *mins = src, *scales = src + 2 * HD, *codes = src + 4 * HD;
        if (header_bad(mins, scales, HD)) return 1;
        uint16_t *g = dst + t0 * HD;
        for (size_t c = 0; c < HD; c += KVT_KEYS_CHUNK) {
            size_t nc = HD - c < KVT_KEYS_CHUNK ? HD - c : KVT_KEYS_CHUNK;
            dec_keys_chunk(mins + 2 * c, scales + 2 * c, codes + c / 2, nt, HD, nc, dtype, g + c);
        }
        src += 4 * HD + nt * HD / 2;
    }
    return 0;
}

static KVT_AVX512_TARGET int a512_k4v4_decode_keys(const uint8_t *src, size_t T, size_t H, size_t D, int dtype,
                                                   uint16_t *dst) {
    return dtype == KVT_F16 ? dec_keys(src, T, H, D, KVT_F16, dst) : dec_keys(src, T, H, D, KVT_BF16, dst);
}

/* Exported to avx512_misc.c for the impl table. */
KVT_AVX512_TARGET size_t kvt_a512_k4v4_encode_keys(const uint16_t *s, size_t T, size_t H, size_t D, int dt, uint8_t *d) {
    return a512_k4v4_encode_keys(s, T, H, D, dt, d);
}
KVT_AVX512_TARGET int kvt_a512_k4v4_decode_keys(const uint8_t *s, size_t T, size_t H, size_t D, int dt, uint16_t *d) {
    return a512_k4v4_decode_keys(s, T, H, D, dt, d);
}
KVT_AVX512_TARGET size_t kvt_a512_k4v4_encode_values(const uint16_t *s, size_t T, size_t H, size_t D, int dt, uint8_t *d) {
    return a512_k4v4_encode_values(s, T, H, D, dt, d);
}
KVT_AVX512_TARGET int kvt_a512_k4v4_decode_values(const uint8_t *s, size_t T, size_t H, size_t D, int dt, uint16_t *d) {
    return a512_k4v4_decode_values(s, T, H, D, dt, d);
}
#endif
