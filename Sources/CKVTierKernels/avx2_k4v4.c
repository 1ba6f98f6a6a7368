/* avx2_k4v4.c - k4v4 encode/decode, AVX2 + F16C + FMA. Assumes MXCSR rounds to nearest even. */
#include "simd_x86.h"
#if defined(__x86_64__)

/* 4 x 8 int32 codes (channels 0-7, 8-15, 16-23, 24-31) -> 16 pack4 bytes. */
KVT_I256 __m128i pack4_256(__m256i c0, __m256i c1, __m256i c2, __m256i c3) {
    __m256i p0 = _mm256_or_si256(c0, _mm256_slli_epi32(c2, 4)), p1 = _mm256_or_si256(c1, _mm256_slli_epi32(c3, 4));
    __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32(p0, p1), 0xD8);
    return _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
}

KVT_I256 __m256i code4_256(__m256 x, __m256 m, __m256 inv) {
    __m256 y = _mm256_mul_ps(_mm256_sub_ps(x, m), inv);
    y = _mm256_min_ps(_mm256_max_ps(y, _mm256_setzero_ps()), _mm256_set1_ps(15.0f));
    return _mm256_cvtps_epi32(y);
}

KVT_I256 size_t enc_values(const uint16_t *src, size_t nblk, int dtype, uint8_t *dst) {
    const uint16_t nf = kvt_nf(dtype);
    for (size_t i = 0; i < nblk; i++, src += 32, dst += 20) {
        __m256i x0 = _mm256_loadu_si256((const __m256i *)src), x1 = _mm256_loadu_si256((const __m256i *)(src + 16));
        __m256i u0 = ukey256(x0), u1 = ukey256(x1);
        uint16_t ulo = hmin_epu16_256(_mm256_min_epu16(u0, u1)), uhi = hmax_epu16_256(_mm256_max_epu16(u0, u1));
        if (uhi >= (0x8000u | nf) || ulo <= 0x7FFFu - nf) return 1;
        uint16_t lob = unukey(ulo), hib = unukey(uhi);
        float lo = dtype == KVT_F16 ? _cvtsh_ss(lob) : kvt_b2f(lob);
        float hi = dtype == KVT_F16 ? _cvtsh_ss(hib) : kvt_b2f(hib);
        uint16_t mb = dtype == KVT_F16 ? lob : (uint16_t)_cvtss_sh(lo, _MM_FROUND_TO_NEAREST_INT);
        uint16_t sb = (uint16_t)_cvtss_sh((hi - lo) / 15.0f, _MM_FROUND_TO_NEAREST_INT);
        if (dtype != KVT_F16 && (kvt_h_nonfinite(mb) || kvt_h_nonfinite(sb))) return 1;
        float s = _cvtsh_ss(sb);
        __m256 m = _mm256_set1_ps(_cvtsh_ss(mb)), inv = _mm256_set1_ps(s > 0 ? 1.0f / s : 0.0f);
        uint32_t hdr = (uint32_t)mb | (uint32_t)sb << 16;
        memcpy(dst, &hdr, 4);
        __m256i c0 = code4_256(w8(_mm256_castsi256_si128(x0), dtype), m, inv);
        __m256i c1 = code4_256(w8(_mm256_extracti128_si256(x0, 1), dtype), m, inv);
        __m256i c2 = code4_256(w8(_mm256_castsi256_si128(x1), dtype), m, inv);
        __m256i c3 = code4_256(w8(_mm256_extracti128_si256(x1, 1), dtype), m, inv);
        _mm_storeu_si128((__m128i *)(dst + 4), pack4_256(c0, c1, c2, c3));
    }
    return 0;
}

static KVT_AVX2_TARGET size_t b_enc_values(const uint16_t *src, size_t T, size_t H, size_t D, int dtype, uint8_t *dst) {
    size_t nblk = T * H * D / 32;
    size_t bad = dtype == KVT_F16 ? enc_values(src, nblk, KVT_F16, dst) : enc_values(src, nblk, KVT_BF16, dst);
    if (!bad) return 0;
    size_t f = kvt_fail_k4v4_values(src, T, H, D, dtype);
    return f ? f : 1;
}

KVT_I256 int dec_values(const uint8_t *src, size_t nblk, int dtype, uint16_t *dst) {
    const __m256 iota0 = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), iota1 = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
    const __m128i ev = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m128i od = _mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m128i m0f = _mm_set1_epi8(0x0F);
    uint32_t bad = 0;
    for (size_t i = 0; i < nblk; i++, src += 20, dst += 32) {
        uint32_t ms;
        memcpy(&ms, src, 4);
        bad |= ((ms & 0x7C00u) == 0x7C00u) | ((ms & 0x7C000000u) == 0x7C000000u) | ((ms >> 16) > 0x8000u);
        __m128 hv = _mm_cvtph_ps(_mm_cvtsi32_si128((int)ms));
        __m256 m = _mm256_broadcastss_ps(hv), s = _mm256_broadcastss_ps(_mm_movehdup_ps(hv));
        __m128i h0 = n8(_mm256_fmadd_ps(iota0, s, m), dtype), h1 = n8(_mm256_fmadd_ps(iota1, s, m), dtype);
        __m128i tlo = _mm_unpacklo_epi64(_mm_shuffle_epi8(h0, ev), _mm_shuffle_epi8(h1, ev));
        __m128i thi = _mm_unpacklo_epi64(_mm_shuffle_epi8(h0, od), _mm_shuffle_epi8(h1, od));
        __m128i q = _mm_loadu_si128((const __m128i *)(src + 4));
        __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m0f), _mm_and_si128(q, m0f));
        __m256i L = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(tlo), codes);
        __m256i Hh = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(thi), codes);
        __m256i wa = _mm256_unpacklo_epi8(L, Hh), wb = _mm256_unpackhi_epi8(L, Hh);
        _mm256_storeu_si256((__m256i *)dst, _mm256_permute2x128_si256(wa, wb, 0x20));
        _mm256_storeu_si256((__m256i *)(dst + 16), _mm256_permute2x128_si256(wa, wb, 0x31));
    }
    return bad != 0;
}

static KVT_AVX2_TARGET int b_dec_values(const uint8_t *src, size_t T, size_t H, size_t D, int dtype, uint16_t *dst) {
    size_t nblk = T * H * D / 32;
    return dtype == KVT_F16 ? dec_values(src, nblk, KVT_F16, dst) : dec_values(src, nblk, KVT_BF16, dst);
}

/* One token group x one 32-channel block. */
KVT_I256 int enc_keys_block(const uint16_t *in, size_t nt, size_t HD, int dtype, uint8_t *mins, uint8_t *scales,
                            uint8_t *codes) {
    const uint16_t nf = kvt_nf(dtype);
    __m256i kmin0 = _mm256_set1_epi16(0x7FFF), kmin1 = kmin0;
    __m256i kmax0 = _mm256_set1_epi16((short)0x8000), kmax1 = kmax0;
    for (size_t t = 0; t < nt; t++) {
        __m256i k0 = skey256(_mm256_loadu_si256((const __m256i *)(in + t * HD)));
        __m256i k1 = skey256(_mm256_loadu_si256((const __m256i *)(in + t * HD + 16)));
        kmin0 = _mm256_min_epi16(kmin0, k0); kmax0 = _mm256_max_epi16(kmax0, k0);
        kmin1 = _mm256_min_epi16(kmin1, k1); kmax1 = _mm256_max_epi16(kmax1, k1);
    }
    __m256i hiv = _mm256_set1_epi16((short)(nf - 1)), lov = _mm256_set1_epi16((short)-nf);
    __m256i badv = _mm256_or_si256(_mm256_or_si256(_mm256_cmpgt_epi16(kmax0, hiv), _mm256_cmpgt_epi16(kmax1, hiv)),
                                   _mm256_or_si256(_mm256_cmpgt_epi16(lov, kmin0), _mm256_cmpgt_epi16(lov, kmin1)));
    if (!_mm256_testz_si256(badv, badv)) return 1;
    __m256i lob[2] = {skey256(kmin0), skey256(kmin1)}, hib[2] = {skey256(kmax0), skey256(kmax1)};
    __m256 m[4], inv[4];
    const __m256 c15 = _mm256_set1_ps(15.0f), one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    const __m128i expo = _mm_set1_epi16(0x7C00);
    __m128i badh = _mm_setzero_si128();
    for (int k = 0; k < 4; k++) {
        __m128i lb = k & 1 ? _mm256_extracti128_si256(lob[k >> 1], 1) : _mm256_castsi256_si128(lob[k >> 1]);
        __m128i hb = k & 1 ? _mm256_extracti128_si256(hib[k >> 1], 1) : _mm256_castsi256_si128(hib[k >> 1]);
        __m256 lo = w8(lb, dtype), hi = w8(hb, dtype);
        __m128i mh = dtype == KVT_F16 ? lb : _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT);
        __m128i sh = _mm256_cvtps_ph(_mm256_div_ps(_mm256_sub_ps(hi, lo), c15), _MM_FROUND_TO_NEAREST_INT);
        badh = _mm_or_si128(badh, _mm_or_si128(_mm_cmpeq_epi16(_mm_and_si128(mh, expo), expo),
                                               _mm_cmpeq_epi16(_mm_and_si128(sh, expo), expo)));
        _mm_storeu_si128((__m128i *)(mins + 16 * k), mh);
        _mm_storeu_si128((__m128i *)(scales + 16 * k), sh);
        __m256 sf = _mm256_cvtph_ps(sh);
        m[k] = _mm256_cvtph_ps(mh);
        inv[k] = _mm256_and_ps(_mm256_div_ps(one, sf), _mm256_cmp_ps(sf, zero, _CMP_GT_OQ));
    }
    if (dtype != KVT_F16 && !_mm_testz_si128(badh, badh)) return 1;
    for (size_t t = 0; t < nt; t++) {
        __m256i x0 = _mm256_loadu_si256((const __m256i *)(in + t * HD));
        __m256i x1 = _mm256_loadu_si256((const __m256i *)(in + t * HD + 16));
        __m256i c0 = code4_256(w8(_mm256_castsi256_si128(x0), dtype), m[0], inv[0]);
        __m256i c1 = code4_256(w8(_mm256_extracti128_si256(x0, 1), dtype), m[1], inv[1]);
        __m256i c2 = code4_256(w8(_mm256_castsi256_si128(x1), dtype), m[2], inv[2]);
        __m256i c3 = code4_256(w8(_mm256_extracti128_si256(x1, 1), dtype), m[3], inv[3]);
        _mm_storeu_si128((__m128i *)(codes + t * (HD / 2)), pack4_256(c0, c1, c2, c3));
    }
    return 0;
}

KVT_I256 int enc_keys(const uint16_t *src, size_t T, size_t H, size_t D, int dtype, uint8_t *dst) {
    size_t HD = H * D;
    for (size_t t0 = 0; t0 < T; t0 += 32) {
        size_t nt = T - t0 < 32 ? T - t0 : 32;
        const uint16_t *g = src + t0 * HD;
        uint8_t *mins = dst, *scales = dst + 2 * HD, *codes = dst + 4 * HD;
        for (size_t c = 0; c < HD; c += 32)
            if (enc_keys_block(g + c, nt, HD, dtype, mins + 2 * c, scales + 2 * c, codes + c / 2)) return 1;
        dst += 4 * HD + nt * HD / 2;
    }
    return 0;
}

static KVT_AVX2_TARGET size_t b_enc_keys(const uint16_t *src, size_t T, size_t H, size_t D, int dtype, uint8_t *dst) {
    int bad = dtype == KVT_F16 ? enc_keys(src, T, H, D, KVT_F16, dst) : enc_keys(src, T, H, D, KVT_BF16, dst);
    if (!bad) return 0;
    size_t f = kvt_fail_k4v4_keys(src, T, H, D, dtype);
    return f ? f : 1;
}

#define KVT_KEYS_CHUNK 1024
/* Keys decode: per token group and chunk of <= 1024 channels, widen scales/mins once into an
 * L1-resident stack table, then write tokens in order (sequential stores). */
KVT_I256 int dec_keys(const uint8_t *src, size_t T, size_t H, size_t D, int dtype, uint16_t *dst) {
    size_t HD = H * D;
    const __m128i m0f = _mm_set1_epi8(0x0F), expo = _mm_set1_epi16(0x7C00), sgn = _mm_set1_epi16((short)0x8000);
    float mf[KVT_KEYS_CHUNK] __attribute__((aligned(32))), sf[KVT_KEYS_CHUNK] __attribute__((aligned(32)));
    for (size_t t0 = 0; t0 < T; t0 += 32) {
        size_t nt = T - t0 < 32 ? T - t0 : 32;
        const uint8_t *mins = src, *scales = src + 2 * HD, *codes = src + 4 * HD;
        uint16_t *g = dst + t0 * HD;
        for (size_t c0 = 0; c0 < HD; c0 += KVT_KEYS_CHUNK) {
            size_t nc = HD - c0 < KVT_KEYS_CHUNK ? HD - c0 : KVT_KEYS_CHUNK;
            __m128i bad = _mm_setzero_si128();
            for (size_t c = 0; c < nc; c += 8) {
                __m128i mh = _mm_loadu_si128((const __m128i *)(mins + 2 * (c0 + c)));
                __m128i sh = _mm_loadu_si128((const __m128i *)(scales + 2 * (c0 + c)));
                /* unsigned sh > 0x8000  <=>  signed (sh ^ 0x8000) > 0 */
                bad = _mm_or_si128(bad, _mm_or_si128(_mm_cmpeq_epi16(_mm_and_si128(mh, expo), expo),
                                                     _mm_cmpeq_epi16(_mm_and_si128(sh, expo), expo)));
                bad = _mm_or_si128(bad, _mm_cmpgt_epi16(_mm_xor_si128(sh, sgn), _mm_setzero_si128()));
                _mm256_store_ps(mf + c, _mm256_cvtph_ps(mh));
                _mm256_store_ps(sf + c, _mm256_cvtph_ps(sh));
            }
            if (!_mm_testz_si128(bad, bad)) return 1;
            for (size_t t = 0; t < nt; t++) {
                const uint8_t *q = codes + (t * HD + c0) / 2;
                uint16_t *o = g + t * HD + c0;
                for (size_t c = 0; c < nc; c += 32) {
                    __m128i qq = _mm_loadu_si128((const __m128i *)(q + c / 2));
                    __m128i lo = _mm_and_si128(qq, m0f), hi = _mm_and_si128(_mm_srli_epi16(qq, 4), m0f);
                    __m256 a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_load_ps(sf + c), _mm256_load_ps(mf + c));
                    __m256 a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), _mm256_load_ps(sf + c + 8), _mm256_load_ps(mf + c + 8));
                    __m256 a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_load_ps(sf + c + 16), _mm256_load_ps(mf + c + 16));
                    __m256 a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), _mm256_load_ps(sf + c + 24), _mm256_load_ps(mf + c + 24));
                    _mm256_storeu_si256((__m256i *)(o + c), _mm256_set_m128i(n8(a1, dtype), n8(a0, dtype)));
                    _mm256_storeu_si256((__m256i *)(o + c + 16), _mm256_set_m128i(n8(a3, dtype), n8(a2, dtype)));
                }
            }
        }
        src += 4 * HD + nt * HD / 2;
    }
    return 0;
}

static KVT_AVX2_TARGET int b_dec_keys(const uint8_t *src, size_t T, size_t H, size_t D, int dtype, uint16_t *dst) {
    return dtype == KVT_F16 ? dec_keys(src, T, H, D, KVT_F16, dst) : dec_keys(src, T, H, D, KVT_BF16, dst);
}

KVT_AVX2_TARGET size_t kvt_a2_k4v4_encode_keys(const uint16_t *s, size_t T, size_t H, size_t D, int dt, uint8_t *d) {
    return b_enc_keys(s, T, H, D, dt, d);
}
KVT_AVX2_TARGET int kvt_a2_k4v4_decode_keys(const uint8_t *s, size_t T, size_t H, size_t D, int dt, uint16_t *d) {
    return b_dec_keys(s, T, H, D, dt, d);
}
KVT_AVX2_TARGET size_t kvt_a2_k4v4_encode_values(const uint16_t *s, size_t T, size_t H, size_t D, int dt, uint8_t *d) {
    return b_enc_values(s, T, H, D, dt, d);
}
KVT_AVX2_TARGET int kvt_a2_k4v4_decode_values(const uint8_t *s, size_t T, size_t H, size_t D, int dt, uint16_t *d) {
    return b_dec_values(s, T, H, D, dt, d);
}
#endif
