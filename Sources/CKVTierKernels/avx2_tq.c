/* avx2_tq.c - tq / tqm kernels for AVX2 (+FMA, F16C).
 *
 * The FWHT runs the spec's stages in order: len 1, 2, 4 inside a ymm (permute, then one fma with
 * +-1, which is exactly the rounded a + b or a - b), len 8, 16, 32 between the registers of a
 * 64-element chunk, then len 64 and up through a stack buffer (the last stage fused with the
 * pass that follows). Codes: |z| (minus one ulp when z < 0, which turns "<" into "<=") is
 * counted against the positive boundaries by integer compares; the code follows by symmetry.
 */
#include "simd_x86.h"
#if defined(__x86_64__)

#define I256 KVT_I256

I256 __m256 load8(const void *p, int dtype, const uint8_t *m) {
    __m256 x = dtype == 0 ? _mm256_loadu_ps(p) : w8(_mm_loadu_si128((const __m128i *)p), dtype);
    if (m) x = _mm256_sub_ps(x, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)m)));
    return x;
}

/* Pack 32 codes c[0..3] (int32 lanes, codes 0..7, 8..15, 16..23, 24..31); returns bytes written. */
I256 int pack32(const __m256i *c, int bits, uint8_t *out) {
    if (bits == 4) {
        __m256i t0 = _mm256_or_si256(c[0], _mm256_slli_epi32(c[2], 4));
        __m256i t1 = _mm256_or_si256(c[1], _mm256_slli_epi32(c[3], 4));
        __m256i u = _mm256_permute4x64_epi64(_mm256_packus_epi32(t0, t1), 0xD8);
        _mm_storeu_si128((__m128i *)out, _mm_packus_epi16(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
        return 16;
    }
    const __m256i three = _mm256_set1_epi32(3);
    __m256i t = _mm256_and_si256(c[0], three);
    for (int k = 1; k < 4; k++) t = _mm256_or_si256(t, _mm256_slli_epi32(_mm256_and_si256(c[k], three), 2 * k));
    __m256i u = _mm256_packus_epi32(t, t); /* [t0..3 t0..3 | t4..7 t4..7] as u16 */
    __m128i b = _mm_packus_epi16(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
    _mm_storel_epi64((__m128i *)out, _mm_shuffle_epi32(b, 0x08)); /* dwords 0, 2 */
    if (bits == 2) return 8;
    uint32_t hb = 0;
    for (int k = 0; k < 4; k++)
        hb |= (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_slli_epi32(c[k], 29))) << (8 * k);
    memcpy(out + 8, &hb, 4);
    return 12;
}

I256 int enc_vec(const kvt_tq_tables *tb, const void *src, int dtype, const uint8_t *mean, int D, int bits,
                 uint8_t *out) {
    float buf[256] __attribute__((aligned(32)));
    int es = dtype == 0 ? 4 : 2, n8 = D < 64 ? D / 8 : 8;
    for (int c = 0; c < D; c += 64) {
        __m256 y[8];
        for (int r = 0; r < n8; r++) {
            int i = c + 8 * r;
            __m256 x = load8((const uint8_t *)src + i * es, dtype, mean ? mean + 2 * i : NULL);
            y[r] = _mm256_xor_ps(x, _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)(tb->sbit + i))));
        }
        fwht_chunk(y, n8);
        for (int r = 0; r < n8; r++) _mm256_store_ps(buf + c + 8 * r, y[r]);
    }
    __m256 acc = _mm256_setzero_ps();
    if (D > 64) {
        fwht_mid(buf, D);
        for (int j = 0; j < D / 2; j += 8) {
            __m256 a = _mm256_load_ps(buf + j), b = _mm256_load_ps(buf + j + D / 2);
            __m256 s = _mm256_add_ps(a, b), d = _mm256_sub_ps(a, b);
            _mm256_store_ps(buf + j, s);
            _mm256_store_ps(buf + j + D / 2, d);
            acc = _mm256_add_ps(acc, _mm256_add_ps(_mm256_mul_ps(s, s), _mm256_mul_ps(d, d)));
        }
    } else {
        for (int j = 0; j < D; j += 8) { __m256 a = _mm256_load_ps(buf + j); acc = _mm256_add_ps(acc, _mm256_mul_ps(a, a)); }
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float rms = _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(_mm_cvtss_f32(h) / (float)D)));
    uint8_t *p = out + 2;
    if (rms == 0.0f) {
        kvt_put_le16(out, 0);
        for (int b = 0; b < D / 32; b++) {
            if (bits == 4) { memset(p, 0x88, 16); p += 16; }
            else if (bits == 2) { memset(p, 0xAA, 8); p += 8; }
            else { memset(p, 0x00, 8); memset(p + 8, 0xFF, 4); p += 12; }
        }
        return 0;
    }
    const int half = 1 << (bits - 1), npos = half - 1;
    const __m256 M = _mm256_loadu_ps(tb->mag[bits - 2]), vr = _mm256_set1_ps(rms);
    const __m256i absm = _mm256_set1_epi32(0x7FFFFFFF), vh = _mm256_set1_epi32(half);
    const __m256i vm = _mm256_set1_epi32(2 * half - 1);
    __m256i P[7];
    for (int j = 0; j < npos; j++) P[j] = _mm256_set1_epi32((int)(kvt_fbits(tb->pos[bits - 2][j]) - 1));
    __m256 num = _mm256_setzero_ps(), den = _mm256_setzero_ps();
    for (int b = 0; b < D; b += 32) {
        __m256i c[4];
        for (int k = 0; k < 4; k++) {
            __m256 y = _mm256_load_ps(buf + b + 8 * k);
            __m256i zi = _mm256_castps_si256(_mm256_add_ps(_mm256_div_ps(y, vr), _mm256_setzero_ps())); /* -0 -> +0 */
            __m256i s = _mm256_srai_epi32(zi, 31);
            __m256i w = _mm256_add_epi32(_mm256_and_si256(zi, absm), s);
            __m256i cnt = _mm256_setzero_si256();
            for (int j = 0; j < npos; j++) cnt = _mm256_sub_epi32(cnt, _mm256_cmpgt_epi32(w, P[j]));
            c[k] = _mm256_xor_si256(_mm256_add_epi32(cnt, vh), _mm256_and_si256(s, vm));
            __m256 m = _mm256_permutevar8x32_ps(M, cnt); /* |L[code]| */
            num = _mm256_add_ps(num, _mm256_mul_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), y), m));
            den = _mm256_add_ps(den, _mm256_mul_ps(m, m));
        }
        p += pack32(c, bits, p);
    }
    __m128 n4 = _mm_add_ps(_mm256_castps256_ps128(num), _mm256_extractf128_ps(num, 1));
    __m128 d4 = _mm_add_ps(_mm256_castps256_ps128(den), _mm256_extractf128_ps(den, 1));
    n4 = _mm_hadd_ps(n4, d4); /* n01 n23 d01 d23 */
    n4 = _mm_hadd_ps(n4, n4);
    uint16_t ab = (uint16_t)_cvtss_sh(_mm_cvtss_f32(n4) / _mm_cvtss_f32(_mm_movehdup_ps(n4)), KVT_RNE);
    kvt_put_le16(out, ab);
    return kvt_h_nonfinite(ab);
}

I256 size_t enc_part(const void *src, size_t vectors, int D, int bits, int dtype, const uint8_t *mean, size_t H,
                     uint8_t *dst) {
    const kvt_tq_tables *tb = kvt_tq_get_tables();
    size_t vs = 2 + (size_t)D * (size_t)bits / 8, es = dtype == 0 ? 4 : 2, h = 0;
    const uint8_t *s = src;
    for (size_t v = 0; v < vectors; v++, s += (size_t)D * es, dst += vs) {
        if (enc_vec(tb, s, dtype, mean ? mean + 2 * h * (size_t)D : NULL, D, bits, dst)) return 1;
        if (++h == H) h = 0;
    }
    return 0;
}

#define A2_ENC_BITS(D)                                                            \
    switch (bits) {                                                               \
    case 2: return enc_part(src, vectors, D, 2, dtype, mean, H, dst);             \
    case 3: return enc_part(src, vectors, D, 3, dtype, mean, H, dst);             \
    default: return enc_part(src, vectors, D, 4, dtype, mean, H, dst);            \
    }

KVT_AVX2_TARGET size_t kvt_tq_encode_avx2(const void *src, size_t vectors, size_t D, int bits, int dtype,
                                          const uint8_t *mean, size_t H, uint8_t *dst) {
    switch (D) {
    case 32: A2_ENC_BITS(32)
    case 64: A2_ENC_BITS(64)
    case 128: A2_ENC_BITS(128)
    default: A2_ENC_BITS(256)
    }
}

KVT_AVX2_TARGET size_t kvt_tq_means_avx2(const uint16_t *src, size_t T, size_t H, size_t D, int dtype,
                                         uint8_t *dst) {
    float acc[2048] __attribute__((aligned(32)));
    size_t HD = H * D, bad = 0;
    const __m256 vt = _mm256_set1_ps((float)T);
    for (size_t c0 = 0; c0 < HD; c0 += 2048) {
        size_t n = HD - c0 < 2048 ? HD - c0 : 2048; /* a multiple of 32 */
        for (size_t i = 0; i < n; i += 8) _mm256_store_ps(acc + i, _mm256_setzero_ps());
        for (size_t t = 0; t < T; t++) {
            const uint16_t *p = src + t * HD + c0;
            for (size_t i = 0; i < n; i += 8)
                _mm256_store_ps(acc + i, _mm256_add_ps(_mm256_load_ps(acc + i),
                                                       w8(_mm_loadu_si128((const __m128i *)(p + i)), dtype)));
        }
        for (size_t i = 0; i < n; i += 8) {
            __m128i m = _mm256_cvtps_ph(_mm256_div_ps(_mm256_load_ps(acc + i), vt), _MM_FROUND_TO_NEAREST_INT);
            _mm_storeu_si128((__m128i *)(dst + 2 * (c0 + i)), m);
            __m128i e = _mm_and_si128(m, _mm_set1_epi16(0x7C00));
            bad += (size_t)__builtin_popcount((unsigned)_mm_movemask_epi8(_mm_cmpeq_epi16(e, _mm_set1_epi16(0x7C00)))) / 2;
        }
    }
    return bad;
}

#endif
