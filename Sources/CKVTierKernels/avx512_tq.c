/* avx512_tq.c - tq / tqm kernels for AVX-512 (F/BW/VL/DQ/VBMI).
 *
 * A vector of D = 16*NR floats lives in NR zmm registers. The FWHT applies the spec's stages in
 * order: len 1, 2, 4, 8 inside each register (partner lanes by permute, then partner +- own as
 * one fma with +-1, which is exactly the rounded a + b or a - b), then len 16.. between registers.
 * Codes: branch-free binary search of z over the sorted boundaries with vpermps; levels by vpermps.
 */
#include "simd_x86.h"
#if defined(__x86_64__)

#define I512 KVT_I512

/* One in-register stage: lane j gets own + partner (bit clear) or partner - own (bit set). */
#define STAGE(v, perm, pm) _mm512_fmadd_ps((v), (pm), (perm))

I512 void fwht512(__m512 *y, int NR) {
    const __m512 p1 = _mm512_setr_ps(1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1);
    const __m512 p2 = _mm512_setr_ps(1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1);
    const __m512 p4 = _mm512_setr_ps(1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1);
    const __m512 p8 = _mm512_setr_ps(1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1);
    for (int r = 0; r < NR; r++) {
        __m512 v = y[r];
        v = STAGE(v, _mm512_permute_ps(v, 0xB1), p1);
        v = STAGE(v, _mm512_permute_ps(v, 0x4E), p2);
        v = STAGE(v, _mm512_shuffle_f32x4(v, v, 0xB1), p4);
        y[r] = STAGE(v, _mm512_shuffle_f32x4(v, v, 0x4E), p8);
    }
    for (int len = 1; len < NR; len <<= 1)
        for (int r = 0; r < NR; r++)
            if (!(r & len)) {
                __m512 a = y[r], b = y[r + len];
                y[r] = _mm512_add_ps(a, b);
                y[r + len] = _mm512_sub_ps(a, b);
            }
}

/* 16 elements at p (dtype 0 = float32), minus 16 fp16 means at m (or not). */
I512 __m512 load16(const void *p, int dtype, const uint8_t *m) {
    __m512 x = dtype == 0 ? _mm512_loadu_ps(p) : w16x16(_mm256_loadu_si256((const __m256i *)p), dtype);
    if (m) x = _mm512_sub_ps(x, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)m)));
    return x;
}

/* count of B[k] <= z (B sorted, 2^bits - 1 entries, padded with +Inf); NaN gives 0. */
I512 __m512i search(__m512 z, __m512 B, int bits) {
    int s = 1 << (bits - 1);
    __m512 b0 = _mm512_permutexvar_ps(_mm512_set1_epi32(s - 1), B);
    __m512i idx = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(b0, z, _CMP_LE_OQ), _mm512_set1_epi32(s));
    for (s >>= 1; s; s >>= 1) {
        __m512 b = _mm512_permutexvar_ps(_mm512_add_epi32(idx, _mm512_set1_epi32(s - 1)), B);
        __mmask16 m = _mm512_cmp_ps_mask(b, z, _CMP_LE_OQ);
        idx = _mm512_mask_add_epi32(idx, m, idx, _mm512_set1_epi32(s));
    }
    return idx;
}

/* Pack 32 codes (c0: codes 0..15, c1: 16..31, int32 lanes) into out; returns bytes written. */
I512 int pack32(__m512i c0, __m512i c1, int bits, uint8_t *out) {
    if (bits == 4) {
        _mm_storeu_si128((__m128i *)out, _mm512_cvtepi32_epi8(_mm512_or_si512(c0, _mm512_slli_epi32(c1, 4))));
        return 16;
    }
    const __m512i three = _mm512_set1_epi32(3);
    __m512i t = _mm512_or_si512(_mm512_and_si512(c0, three), _mm512_slli_epi32(_mm512_and_si512(c1, three), 4));
    t = _mm512_or_si512(t, _mm512_slli_epi32(_mm512_shuffle_i32x4(t, t, 0xEE), 2));
    _mm_storel_epi64((__m128i *)out, _mm512_cvtepi32_epi8(t));
    if (bits == 2) return 8;
    const __m512i four = _mm512_set1_epi32(4);
    uint32_t hb = (uint32_t)_mm512_test_epi32_mask(c0, four) | (uint32_t)_mm512_test_epi32_mask(c1, four) << 16;
    memcpy(out + 8, &hb, 4); /* little-endian */
    return 12;
}

/* Encode one vector; returns 1 if alpha is not finite (also the case for non-finite input). */
I512 int enc_vec(const kvt_tq_tables *tb, const void *src, int dtype, const uint8_t *mean, int NR, int bits,
                 uint8_t *out) {
    __m512 y[16];
    size_t es = dtype == 0 ? 4 : 2;
    for (int r = 0; r < NR; r++) {
        __m512 x = load16((const uint8_t *)src + 16 * r * es, dtype, mean ? mean + 32 * r : NULL);
        y[r] = _mm512_xor_ps(x, _mm512_castsi512_ps(_mm512_loadu_si512(tb->sbit + 16 * r)));
    }
    fwht512(y, NR);
    __m512 acc = _mm512_mul_ps(y[0], y[0]);
    for (int r = 1; r < NR; r++) acc = _mm512_add_ps(acc, _mm512_mul_ps(y[r], y[r]));
    float ss = _mm512_reduce_add_ps(acc);
    float rms = _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(ss / (float)(16 * NR))));
    uint8_t *p = out + 2;
    if (rms == 0.0f) {
        kvt_put_le16(out, 0);
        for (int b = 0; b < NR / 2; b++) {
            if (bits == 4) { memset(p, 0x88, 16); p += 16; }
            else if (bits == 2) { memset(p, 0xAA, 8); p += 8; }
            else { memset(p, 0x00, 8); memset(p + 8, 0xFF, 4); p += 12; }
        }
        return 0;
    }
    const __m512 B = _mm512_loadu_ps(tb->bnd[bits - 2]), L = _mm512_loadu_ps(tb->lev[bits - 2]);
    const __m512 vr = _mm512_set1_ps(rms);
    __m512 num = _mm512_setzero_ps(), den = _mm512_setzero_ps();
    __m512i c[16];
    for (int r = 0; r < NR; r++) {
        c[r] = search(_mm512_div_ps(y[r], vr), B, bits);
        __m512 l = _mm512_permutexvar_ps(c[r], L);
        num = _mm512_add_ps(num, _mm512_mul_ps(y[r], l));
        den = _mm512_add_ps(den, _mm512_mul_ps(l, l));
    }
    float a = _mm512_reduce_add_ps(num) / _mm512_reduce_add_ps(den);
    uint16_t ab = (uint16_t)_cvtss_sh(a, KVT_RNE);
    kvt_put_le16(out, ab);
    for (int b = 0; b < NR / 2; b++) p += pack32(c[2 * b], c[2 * b + 1], bits, p);
    return kvt_h_nonfinite(ab);
}

I512 size_t enc_part(const void *src, size_t vectors, int bits, int dtype, const uint8_t *mean, size_t H,
                     uint8_t *dst, int NR) {
    const kvt_tq_tables *tb = kvt_tq_get_tables();
    size_t D = 16 * (size_t)NR, vs = 2 + D * (size_t)bits / 8, es = dtype == 0 ? 4 : 2, h = 0;
    const uint8_t *s = src;
    for (size_t v = 0; v < vectors; v++, s += D * es, dst += vs) {
        if (enc_vec(tb, s, dtype, mean ? mean + 2 * h * D : NULL, NR, bits, dst)) return 1;
        if (++h == H) h = 0;
    }
    return 0;
}

#define ENC_BITS(NR)                                                              \
    switch (bits) {                                                               \
    case 2: return enc_part(src, vectors, 2, dtype, mean, H, dst, NR);            \
    case 3: return enc_part(src, vectors, 3, dtype, mean, H, dst, NR);            \
    default: return enc_part(src, vectors, 4, dtype, mean, H, dst, NR);           \
    }

KVT_AVX512_TARGET size_t kvt_tq_encode_avx512(const void *src, size_t vectors, size_t D, int bits, int dtype,
                                              const uint8_t *mean, size_t H, uint8_t *dst) {
    switch (D) {
    case 32: ENC_BITS(2)
    case 64: ENC_BITS(4)
    case 128: ENC_BITS(8)
    default: ENC_BITS(16)
    }
}

/* Levels of 32 codes of one block at in (alpha already folded into the 16-entry table). */
I512 const uint8_t *unpack32(const uint8_t *in, int bits, __m512 tab, __m512 *y0, __m512 *y1) {
    if (bits == 4) {
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)in));
        *y0 = _mm512_permutexvar_ps(v, tab); /* vpermps reads index bits 0..3 only */
        *y1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tab);
        return in + 16;
    }
    __m128i q = _mm_loadl_epi64((const __m128i *)in);
    __m512i v = _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(q, q)); /* bytes 0..7, 0..7 */
    __m512i lo = _mm512_srlv_epi32(v, _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2));
    __m512i hi = _mm512_srlv_epi32(v, _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6));
    if (bits == 3) {
        uint32_t hb;
        memcpy(&hb, in + 8, 4);
        const __m512i three = _mm512_set1_epi32(3), four = _mm512_set1_epi32(4);
        lo = _mm512_and_si512(lo, three);
        hi = _mm512_and_si512(hi, three);
        lo = _mm512_mask_or_epi32(lo, (__mmask16)hb, lo, four);
        hi = _mm512_mask_or_epi32(hi, (__mmask16)(hb >> 16), hi, four);
    }
    /* 2-bit: bits 2..3 are garbage, and levr repeats the 4 levels */
    *y0 = _mm512_permutexvar_ps(lo, tab);
    *y1 = _mm512_permutexvar_ps(hi, tab);
    return in + (bits == 3 ? 12 : 8);
}

I512 int dec_vec(const kvt_tq_tables *tb, const uint8_t *in, int NR, int bits, int dtype, const uint8_t *mean,
                 void *dst) {
    uint16_t ab = kvt_le16(in);
    if (kvt_h_nonfinite(ab)) return 1;
    __m512 tab = _mm512_mul_ps(_mm512_set1_ps(_cvtsh_ss(ab)), _mm512_loadu_ps(tb->levr[bits - 2]));
    __m512 y[16];
    in += 2;
    for (int b = 0; b < NR / 2; b++) in = unpack32(in, bits, tab, &y[2 * b], &y[2 * b + 1]);
    fwht512(y, NR);
    const float *sd = tb->signd[NR == 2 ? 0 : NR == 4 ? 1 : NR == 8 ? 2 : 3];
    for (int r = 0; r < NR; r++) {
        __m512 x = _mm512_mul_ps(y[r], _mm512_loadu_ps(sd + 16 * r));
        if (mean) x = _mm512_add_ps(x, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(mean + 32 * r))));
        if (dtype == 0) _mm512_storeu_ps((float *)dst + 16 * r, x);
        else _mm256_storeu_si256((__m256i *)((uint16_t *)dst + 16 * r), n16x16(x, dtype));
    }
    return 0;
}

I512 int dec_part(const uint8_t *src, size_t vectors, int bits, int dtype, const uint8_t *mean, size_t H,
                  void *dst, int NR) {
    const kvt_tq_tables *tb = kvt_tq_get_tables();
    size_t D = 16 * (size_t)NR, vs = 2 + D * (size_t)bits / 8, es = dtype == 0 ? 4 : 2, h = 0;
    uint8_t *d = dst;
    for (size_t v = 0; v < vectors; v++, src += vs, d += D * es) {
        if (dec_vec(tb, src, NR, bits, dtype, mean ? mean + 2 * h * D : NULL, d)) return 1;
        if (++h == H) h = 0;
    }
    return 0;
}

#define DEC_DT(NR, B)                                                             \
    switch (dtype) {                                                              \
    case KVT_F16: return dec_part(src, vectors, B, KVT_F16, mean, H, dst, NR);    \
    case KVT_BF16: return dec_part(src, vectors, B, KVT_BF16, mean, H, dst, NR);  \
    default: return dec_part(src, vectors, B, 0, mean, H, dst, NR);               \
    }
#define DEC_BITS(NR)                                                              \
    switch (bits) {                                                               \
    case 2: DEC_DT(NR, 2)                                                         \
    case 3: DEC_DT(NR, 3)                                                         \
    default: DEC_DT(NR, 4)                                                        \
    }

KVT_AVX512_TARGET int kvt_tq_decode_avx512(const uint8_t *src, size_t vectors, size_t D, int bits, int dtype,
                                           const uint8_t *mean, size_t H, void *dst) {
    switch (D) {
    case 32: DEC_BITS(2)
    case 64: DEC_BITS(4)
    case 128: DEC_BITS(8)
    default: DEC_BITS(16)
    }
}

/* tqm means: column sums in float32 over t (in order), chunks of 2048 columns on the stack. */
KVT_AVX512_TARGET size_t kvt_tq_means_avx512(const uint16_t *src, size_t T, size_t H, size_t D, int dtype,
                                             uint8_t *dst) {
    float acc[2048] __attribute__((aligned(64)));
    size_t HD = H * D, bad = 0;
    const __m512 vt = _mm512_set1_ps((float)T);
    for (size_t c0 = 0; c0 < HD; c0 += 2048) {
        size_t n = HD - c0 < 2048 ? HD - c0 : 2048; /* a multiple of 32 */
        for (size_t i = 0; i < n; i += 16) _mm512_store_ps(acc + i, _mm512_setzero_ps());
        for (size_t t = 0; t < T; t++) {
            const uint16_t *p = src + t * HD + c0;
            for (size_t i = 0; i < n; i += 16)
                _mm512_store_ps(acc + i, _mm512_add_ps(_mm512_load_ps(acc + i),
                                                       w16x16(_mm256_loadu_si256((const __m256i *)(p + i)), dtype)));
        }
        for (size_t i = 0; i < n; i += 16) {
            __m256i m = _mm512_cvtps_ph(_mm512_div_ps(_mm512_load_ps(acc + i), vt), KVT_RNE);
            _mm256_storeu_si256((__m256i *)(dst + 2 * (c0 + i)), m);
            __m256i e = _mm256_and_si256(m, _mm256_set1_epi16(0x7C00));
            bad += (size_t)__builtin_popcount(_mm256_cmpeq_epi16_mask(e, _mm256_set1_epi16(0x7C00)));
        }
    }
    return bad;
}

#endif
