/* internal.h - private helpers shared by the kernel files (not part of the API). */
#ifndef KVT_INTERNAL_H
#define KVT_INTERNAL_H

#include "kvtier_kernels.h"
#include <string.h>
#include <stdint.h>
#include <stddef.h>

/* No FMA contraction anywhere: the spec fixes a multiply then an add. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#define KVT_INLINE static inline __attribute__((always_inline))
#define KVT_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define KVT_AVX512_TARGET \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,fma,f16c,avx2")))

/* Exponent-all-ones threshold on the magnitude bits, per dtype. */
#define KVT_NF_F16 0x7C00u
#define KVT_NF_BF16 0x7F80u

/* ---- unaligned little-endian access ---- */
KVT_INLINE uint16_t kvt_ld16(const void *p) { uint16_t v; memcpy(&v, p, 2); return v; }
KVT_INLINE void kvt_st16(void *p, uint16_t v) { memcpy(p, &v, 2); }
KVT_INLINE uint16_t kvt_le16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
KVT_INLINE void kvt_put_le16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
KVT_INLINE float kvt_ldf(const float *p) { float v; memcpy(&v, p, 4); return v; }
KVT_INLINE void kvt_stf(float *p, float v) { memcpy(p, &v, 4); }

KVT_INLINE uint32_t kvt_fbits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
KVT_INLINE float kvt_bitsf(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* ---- portable conversions (bit-identical to F16C / the integer bf16 rounding) ---- */
KVT_INLINE float kvt_h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1F) return kvt_bitsf(sign | 0x7F800000u | (m << 13) | (m ? 0x400000u : 0));
    if (e == 0) {
        float v = (float)m * 5.9604644775390625e-8f; /* m * 2^-24, exact */
        return kvt_bitsf(kvt_fbits(v) | sign);
    }
    return kvt_bitsf(sign | ((e + 112u) << 23) | (m << 13));
}

KVT_INLINE uint16_t kvt_f2h(float f) {
    uint32_t x = kvt_fbits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u) /* Inf or NaN (quieted, payload truncated) */
        return (uint16_t)(sign | (ax == 0x7F800000u ? 0x7C00u : (0x7E00u | ((ax >> 13) & 0x3FFu))));
    if (ax >= 0x47800000u) return (uint16_t)(sign | 0x7C00u); /* >= 65536 */
    if (ax >= 0x38800000u) {                                    /* normal half (or rounds to Inf) */
        uint32_t r = ax - 0x38000000u;
        r = r + 0xFFFu + ((r >> 13) & 1u);
        return (uint16_t)(sign | (r >> 13));
    }
    /* subnormal half or zero: let the FPU round at the 2^-24 position */
    float v = kvt_bitsf(ax) + 0.5f;
    return (uint16_t)(sign | (uint16_t)(kvt_fbits(v) - 0x3F000000u));
}

KVT_INLINE float kvt_b2f(uint16_t b) { return kvt_bitsf((uint32_t)b << 16); }

KVT_INLINE uint16_t kvt_f2b(float f) {
    uint32_t x = kvt_fbits(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((x >> 16) | 0x40u);
    return (uint16_t)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

KVT_INLINE float kvt_widen(uint16_t v, int dtype) { return dtype == KVT_F16 ? kvt_h2f(v) : kvt_b2f(v); }
KVT_INLINE uint16_t kvt_narrow(float f, int dtype) { return dtype == KVT_F16 ? kvt_f2h(f) : kvt_f2b(f); }

/* Round to nearest integer, ties to even, for |v| < 2^22 (default rounding mode). */
KVT_INLINE float kvt_rne(float v) {
    const float m = 12582912.0f; /* 1.5 * 2^23 (not folded: no fast-math) */
    return (v + m) - m;
}

/* Total-order key of a sign-magnitude 16-bit float: -0 < +0, signed compare. */
KVT_INLINE int16_t kvt_key(uint16_t b) { return (int16_t)(b ^ ((b & 0x8000u) ? 0x7FFFu : 0u)); }
KVT_INLINE uint16_t kvt_unkey(int16_t k) { return (uint16_t)((uint16_t)k ^ (k < 0 ? 0x7FFFu : 0u)); }

/* fp16 bits that are NaN or Inf. */
KVT_INLINE int kvt_h_nonfinite(uint16_t h) { return (h & 0x7C00u) == 0x7C00u; }
/* A stored scale is corrupt if NaN/Inf or < 0 (-0 is accepted). */
KVT_INLINE int kvt_bad_scale(uint16_t s) { return (s & 0x7C00u) == 0x7C00u || s > 0x8000u; }

/* Non-finite threshold for the dtype (on the magnitude bits). */
KVT_INLINE uint16_t kvt_nf(int dtype) { return dtype == KVT_F16 ? (uint16_t)KVT_NF_F16 : (uint16_t)KVT_NF_BF16; }

/* ---- failure counting (scalar, exact, shared by every path) ---- */
size_t kvt_fail_q8(const uint16_t *src, size_t T, size_t H, size_t D, int dtype);
size_t kvt_fail_k4v4_keys(const uint16_t *src, size_t T, size_t H, size_t D, int dtype);
size_t kvt_fail_k4v4_values(const uint16_t *src, size_t T, size_t H, size_t D, int dtype);

/* ---- tq tables ---- */
typedef struct {
    float sign[256];      /* +-1 */
    uint32_t sbit[256];   /* 0x80000000 where sign is -1, else 0 (xor mask) */
    float signd[4][256];  /* sign[i] / D for D = 32, 64, 128, 256 (index log2(D) - 5) */
    float lev[3][16];     /* levels for bits 2,3,4 (index bits-2) */
    float levr[3][16];    /* levels repeated: levr[b][k] = lev[b][k mod 2^bits] */
    float bnd[3][16];     /* decision boundaries (count 2^bits - 1), padded with +Inf */
    float lev2[3][16];    /* levels squared */
    float pos[3][8];      /* positive boundaries bnd[b][n/2 + j] (n/2 - 1 of them), padded with +Inf */
    float mag[3][8];      /* upper half of the levels: lev[b][n/2 + j] */
} kvt_tq_tables;
const kvt_tq_tables *kvt_tq_get_tables(void);

/* ---- scalar tq pieces shared by tq.c and tqx.c ---- */

/* Unnormalized Walsh-Hadamard transform in place, stages len = 1, 2, ..., D/2. */
static inline void kvt_fwht(float *y, size_t D) {
    for (size_t len = 1; len < D; len <<= 1)
        for (size_t j0 = 0; j0 < D; j0 += 2 * len)
            for (size_t j = j0; j < j0 + len; j++) {
                float a = y[j], b = y[j + len];
                y[j] = a + b;
                y[j + len] = a - b;
            }
}

/* Bytes of one packed block of 32 codes of `bits` (2 or 3), plus `half` (one more bit for codes
 * 0...15). */
KVT_INLINE size_t kvt_block_bytes(int bits, int half) { return 8 + (bits == 3 ? 4 : 0) + (half ? 2 : 0); }

/* Packs 32 codes: their low 2 bits four to a byte (code i, i+8, i+16, i+24 in byte i), then for
 * 3 bits each code's bit 2 as one little-endian u32, then for `half` bit `bits` of codes 0...15 as
 * one little-endian u16. Layouts: docs/codec-layouts.md. */
static inline void kvt_pack_block(const uint8_t *c, int bits, int half, uint8_t *out) {
    for (int i = 0; i < 8; i++)
        out[i] = (uint8_t)((c[i] & 3) | (c[i + 8] & 3) << 2 | (c[i + 16] & 3) << 4 | (c[i + 24] & 3) << 6);
    out += 8;
    if (bits == 3) {
        uint32_t w = 0;
        for (int j = 0; j < 32; j++) w |= (uint32_t)((c[j] >> 2) & 1) << j;
        out[0] = (uint8_t)w; out[1] = (uint8_t)(w >> 8); out[2] = (uint8_t)(w >> 16); out[3] = (uint8_t)(w >> 24);
        out += 4;
    }
    if (half) {
        uint32_t w = 0;
        for (int j = 0; j < 16; j++) w |= (uint32_t)((c[j] >> bits) & 1) << j;
        out[0] = (uint8_t)w; out[1] = (uint8_t)(w >> 8);
    }
}

/* The inverse of kvt_pack_block. */
static inline void kvt_unpack_block(const uint8_t *in, int bits, int half, uint8_t *c) {
    for (int i = 0; i < 8; i++) {
        uint8_t v = in[i];
        c[i] = v & 3; c[i + 8] = (v >> 2) & 3; c[i + 16] = (v >> 4) & 3; c[i + 24] = v >> 6;
    }
    in += 8;
    if (bits == 3) {
        uint32_t w = (uint32_t)in[0] | (uint32_t)in[1] << 8 | (uint32_t)in[2] << 16 | (uint32_t)in[3] << 24;
        for (int j = 0; j < 32; j++) c[j] |= (uint8_t)(((w >> j) & 1) << 2);
        in += 4;
    }
    if (half) {
        uint32_t w = (uint32_t)in[0] | (uint32_t)in[1] << 8;
        for (int j = 0; j < 16; j++) c[j] |= (uint8_t)(((w >> j) & 1) << bits);
    }
}

/* Exact scalar failure counts (shared by every path; only run after a path saw a failure). */
size_t kvt_tq_fail(const void *src, size_t vectors, size_t D, int bits, int dtype);
size_t kvt_tqm_fail(const uint16_t *src, size_t T, size_t H, size_t D, int bits, int dtype);

/* ---- per-level implementation table ---- */
typedef struct {
    void (*f16_to_f32)(const uint16_t *, size_t, float *);
    void (*f32_to_f16)(const float *, size_t, uint16_t *);
    void (*bf16_to_f32)(const uint16_t *, size_t, float *);
    void (*f32_to_bf16)(const float *, size_t, uint16_t *);
    size_t (*count_nonfinite)(const uint16_t *, size_t, uint16_t nf);
    void (*shuffle2)(const uint8_t *, size_t, uint8_t *);
    void (*unshuffle2)(const uint8_t *, size_t, uint8_t *);
    size_t (*q8_encode)(const uint16_t *, size_t, size_t, size_t, int, uint8_t *);
    int (*q8_decode)(const uint8_t *, size_t, size_t, size_t, int, uint16_t *);
    size_t (*k4v4_encode_keys)(const uint16_t *, size_t, size_t, size_t, int, uint8_t *);
    int (*k4v4_decode_keys)(const uint8_t *, size_t, size_t, size_t, int, uint16_t *);
    size_t (*k4v4_encode_values)(const uint16_t *, size_t, size_t, size_t, int, uint8_t *);
    int (*k4v4_decode_values)(const uint8_t *, size_t, size_t, size_t, int, uint16_t *);
    /* tq on `vectors` vectors of D (dtype 0 = float32 elements). `mean` is NULL, or H*D fp16
     * (little-endian bytes, unaligned) subtracted from / added to vector v as head v % H (tqm).
     * Encode returns 0, or non-zero as soon as a vector's alpha is not finite (the caller then
     * counts failures exactly); decode returns 0 or 1 (non-finite alpha). */
    size_t (*tq_encode)(const void *src, size_t vectors, size_t D, int bits, int dtype,
                        const uint8_t *mean, size_t H, uint8_t *dst);
    int (*tq_decode)(const uint8_t *src, size_t vectors, size_t D, int bits, int dtype,
                     const uint8_t *mean, size_t H, void *dst);
    /* tqm means: writes H*D fp16 f16((sum_t x[t][h][d]) / T) to dst; returns how many are not finite. */
    size_t (*tq_means)(const uint16_t *src, size_t T, size_t H, size_t D, int dtype, uint8_t *dst);
} kvt_impl;

extern const kvt_impl kvt_impl_scalar;
#if defined(__x86_64__)
extern const kvt_impl kvt_impl_avx2;
extern const kvt_impl kvt_impl_avx512;
#endif

#endif
