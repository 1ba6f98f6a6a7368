/* scalar.c - portable scalar kernels (the only path off x86_64) and exact failure counting. */
#include "internal.h"

static void s_f16_to_f32(const uint16_t *src, size_t n, float *dst) {
    for (size_t i = 0; i < n; i++) kvt_stf(dst + i, kvt_h2f(kvt_ld16(src + i)));
}
static void s_f32_to_f16(const float *src, size_t n, uint16_t *dst) {
    for (size_t i = 0; i < n; i++) kvt_st16(dst + i, kvt_f2h(kvt_ldf(src + i)));
}
static void s_bf16_to_f32(const uint16_t *src, size_t n, float *dst) {
    for (size_t i = 0; i < n; i++) kvt_stf(dst + i, kvt_b2f(kvt_ld16(src + i)));
}
static void s_f32_to_bf16(const float *src, size_t n, uint16_t *dst) {
    for (size_t i = 0; i < n; i++) kvt_st16(dst + i, kvt_f2b(kvt_ldf(src + i)));
}
static size_t s_count_nonfinite(const uint16_t *src, size_t n, uint16_t nf) {
    size_t c = 0;
    for (size_t i = 0; i < n; i++) c += (kvt_ld16(src + i) & nf) == nf;
    return c;
}
static void s_shuffle2(const uint8_t *src, size_t n, uint8_t *dst) {
    for (size_t i = 0; i < n; i++) { dst[i] = src[2 * i]; dst[n + i] = src[2 * i + 1]; }
}
static void s_unshuffle2(const uint8_t *src, size_t n, uint8_t *dst) {
    for (size_t i = 0; i < n; i++) { dst[2 * i] = src[i]; dst[2 * i + 1] = src[n + i]; }
}

/* ---------------- failure counting ---------------- */

/* Overflow of f16(v) (only possible for bf16 input). */
static int ovf(float v) { return kvt_h_nonfinite(kvt_f2h(v)); }

size_t kvt_fail_q8(const uint16_t *src, size_t T, size_t H, size_t D, int dtype) {
    uint16_t nf = kvt_nf(dtype);
    size_t fails = 0;
    for (size_t v = 0; v < T * H; v++) {
        const uint16_t *x = src + v * D;
        size_t bad = s_count_nonfinite(x, D, nf);
        fails += bad;
        if (bad == 0) {
            float amax = 0.0f;
            for (size_t i = 0; i < D; i++) {
                float a = kvt_widen(kvt_ld16(x + i), dtype);
                a = a < 0 ? -a : a;
                if (a > amax) amax = a;
            }
            fails += ovf(amax / 127.0f);
        }
    }
    return fails;
}

/* One k4v4 group of n elements at stride `stride`: non-finite count, else 1 if min/scale overflow. */
static size_t fail_group(const uint16_t *x, size_t n, size_t stride, int dtype) {
    uint16_t nf = kvt_nf(dtype);
    size_t bad = 0;
    float lo = 0, hi = 0;
    for (size_t i = 0; i < n; i++) {
        uint16_t b = kvt_ld16(x + i * stride);
        if ((b & nf) == nf) { bad++; continue; }
        float f = kvt_widen(b, dtype);
        if (i == 0 || f < lo) lo = f;
        if (i == 0 || f > hi) hi = f;
    }
    if (bad) return bad;
    return (size_t)(ovf(lo) || ovf((hi - lo) / 15.0f));
}

size_t kvt_fail_k4v4_keys(const uint16_t *src, size_t T, size_t H, size_t D, int dtype) {
    size_t HD = H * D, fails = 0;
    for (size_t t0 = 0; t0 < T; t0 += 32) {
        size_t nt = T - t0 < 32 ? T - t0 : 32;
        for (size_t c = 0; c < HD; c++) fails += fail_group(src + t0 * HD + c, nt, HD, dtype);
    }
    return fails;
}

size_t kvt_fail_k4v4_values(const uint16_t *src, size_t T, size_t H, size_t D, int dtype) {
    size_t fails = 0;
    for (size_t i = 0; i < T * H * D; i += 32) fails += fail_group(src + i, 32, 1, dtype);
    return fails;
}

/* ---------------- q8 ---------------- */

static size_t s_q8_encode(const uint16_t *src, size_t T, size_t H, size_t D, int dtype, uint8_t *dst) {
    uint16_t nf = kvt_nf(dtype);
    for (size_t v = 0; v < T * H; v++) {
        const uint16_t *x = src + v * D;
        uint16_t amax = 0;
        for (size_t i = 0; i < D; i++) {
            uint16_t m = kvt_ld16(x + i) & 0x7FFFu;
            amax = m > amax ? m : amax;
        }
        if (amax >= nf) goto fail;
        uint16_t sb = kvt_f2h(kvt_widen(amax, dtype) / 127.0f);
        if (kvt_h_nonfinite(sb)) goto fail;
        float s = kvt_h2f(sb), inv = s > 0 ? 1.0f / s : 0.0f;
        kvt_put_le16(dst, sb);
        int8_t *q = (int8_t *)(dst + 2);
        for (size_t i = 0; i < D; i++) {
            float y = kvt_widen(kvt_ld16(x + i), dtype) * inv;
            y = y < -127.0f ? -127.0f : (y > 127.0f ? 127.0f : y);
            q[i] = (int8_t)kvt_rne(y);
        }
        dst += D + 2;
    }
    return 0;
fail:;
    size_t f = kvt_fail_q8(src, T, H, D, dtype);
    return f ? f : 1;
}

static int s_q8_decode(const uint8_t *src, size_t T, size_t H, size_t D, int dtype, uint16_t *dst) {
    for (size_t v = 0; v < T * H; v++) {
        uint16_t sb = kvt_le16(src);
        if (kvt_bad_scale(sb)) return 1;
        float s = kvt_h2f(sb);
        const int8_t *q = (const int8_t *)(src + 2);
        for (size_t i = 0; i < D; i++) kvt_st16(dst + i, kvt_narrow((float)q[i] * s, dtype));
        src += D + 2;
        dst += D;
    }
    return 0;
}

/* ---------------- k4v4 ---------------- */

/* min/max/inv of one group given its total-order key extremes; returns 0 on overflow. */
static int group_params(int16_t klo, int16_t khi, int dtype, uint16_t *mb, uint16_t *sb, float *m, float *inv) {
    float lo = kvt_widen(kvt_unkey(klo), dtype), hi = kvt_widen(kvt_unkey(khi), dtype);
    *mb = kvt_f2h(lo);
    *sb = kvt_f2h((hi - lo) / 15.0f);
    if (kvt_h_nonfinite(*mb) || kvt_h_nonfinite(*sb)) return 0;
    *m = kvt_h2f(*mb);
    float s = kvt_h2f(*sb);
    *inv = s > 0 ? 1.0f / s : 0.0f;
    return 1;
}

KVT_INLINE uint8_t code4(float x, float m, float inv) {
    float y = (x - m) * inv;
    y = y < 0.0f ? 0.0f : (y > 15.0f ? 15.0f : y);
    return (uint8_t)kvt_rne(y);
}

static size_t s_k4v4_encode_values(const uint16_t *src, size_t T, size_t H, size_t D, int dtype, uint8_t *dst) {
    int16_t nf = (int16_t)kvt_nf(dtype);
    for (size_t i = 0; i < T * H * D; i += 32) {
        const uint16_t *x = src + i;
        int16_t klo = 0x7FFF, khi = -0x8000;
        for (int j = 0; j < 32; j++) {
            int16_t k = kvt_key(kvt_ld16(x + j));
            klo = k < klo ? k : klo;
            khi = k > khi ? k : khi;
        }
        uint16_t mb, sb;
        float m, inv;
        if (khi >= nf || klo <= -1 - nf || !group_params(klo, khi, dtype, &mb, &sb, &m, &inv)) goto fail;
        kvt_put_le16(dst, mb);
        kvt_put_le16(dst + 2, sb);
        for (int j = 0; j < 16; j++)
            dst[4 + j] = (uint8_t)(code4(kvt_widen(kvt_ld16(x + j), dtype), m, inv) |
                                   code4(kvt_widen(kvt_ld16(x + j + 16), dtype), m, inv) << 4);
        dst += 20;
    }
    return 0;
fail:;
    size_t f = kvt_fail_k4v4_values(src, T, H, D, dtype);
    return f ? f : 1;
}

static int s_k4v4_decode_values(const uint8_t *src, size_t T, size_t H, size_t D, int dtype, uint16_t *dst) {
    for (size_t i = 0; i < T * H * D; i += 32) {
        uint16_t mb = kvt_le16(src), sb = kvt_le16(src + 2);
        if (kvt_h_nonfinite(mb) || kvt_bad_scale(sb)) return 1;
        float m = kvt_h2f(mb), s = kvt_h2f(sb);
        uint16_t lut[16];
        /* fma(c, s, m) == c*s + m here: c*s is exact (4-bit times 11-bit significand). */
        for (int c = 0; c < 16; c++) lut[c] = kvt_narrow((float)c * s + m, dtype);
        for (int j = 0; j < 16; j++) {
            uint8_t b = src[4 + j];
            kvt_st16(dst + i + j, lut[b & 15]);
            kvt_st16(dst + i + j + 16, lut[b >> 4]);
        }
        src += 20;
    }
    return 0;
}

static size_t s_k4v4_encode_keys(const uint16_t *src, size_t T, size_t H, size_t D, int dtype, uint8_t *dst) {
    size_t HD = H * D;
    int16_t nf = (int16_t)kvt_nf(dtype);
    for (size_t t0 = 0; t0 < T; t0 += 32) {
        size_t nt = T - t0 < 32 ? T - t0 : 32;
        const uint16_t *g = src + t0 * HD;
        uint8_t *mins = dst, *scales = dst + 2 * HD, *codes = dst + 4 * HD;
        for (size_t c = 0; c < HD; c += 32) {
            float m[32], inv[32];
            for (int j = 0; j < 32; j++) {
                int16_t klo = 0x7FFF, khi = -0x8000;
                for (size_t t = 0; t < nt; t++) {
                    int16_t k = kvt_key(kvt_ld16(g + t * HD + c + j));
                    klo = k < klo ? k : klo;
                    khi = k > khi ? k : khi;
                }
                uint16_t mb, sb;
                if (khi >= nf || klo <= -1 - nf || !group_params(klo, khi, dtype, &mb, &sb, &m[j], &inv[j]))
                    goto fail;
                kvt_put_le16(mins + 2 * (c + j), mb);
                kvt_put_le16(scales + 2 * (c + j), sb);
            }
            for (size_t t = 0; t < nt; t++) {
                const uint16_t *x = g + t * HD + c;
                uint8_t *o = codes + (t * HD + c) / 2;
                for (int j = 0; j < 16; j++)
                    o[j] = (uint8_t)(code4(kvt_widen(kvt_ld16(x + j), dtype), m[j], inv[j]) |
                                     code4(kvt_widen(kvt_ld16(x + j + 16), dtype), m[j + 16], inv[j + 16]) << 4);
            }
        }
        dst += 4 * HD + nt * HD / 2;
    }
    return 0;
fail:;
    size_t f = kvt_fail_k4v4_keys(src, T, H, D, dtype);
    return f ? f : 1;
}

static int s_k4v4_decode_keys(const uint8_t *src, size_t T, size_t H, size_t D, int dtype, uint16_t *dst) {
    size_t HD = H * D;
    for (size_t t0 = 0; t0 < T; t0 += 32) {
        size_t nt = T - t0 < 32 ? T - t0 : 32;
        const uint8_t *mins = src, *scales = src + 2 * HD, *codes = src + 4 * HD;
        uint16_t *g = dst + t0 * HD;
        for (size_t c = 0; c < HD; c += 32) {
            float m[32], s[32];
            for (int j = 0; j < 32; j++) {
                uint16_t mb = kvt_le16(mins + 2 * (c + j)), sb = kvt_le16(scales + 2 * (c + j));
                if (kvt_h_nonfinite(mb) || kvt_bad_scale(sb)) return 1;
                m[j] = kvt_h2f(mb);
                s[j] = kvt_h2f(sb);
            }
            for (size_t t = 0; t < nt; t++) {
                const uint8_t *q = codes + (t * HD + c) / 2;
                uint16_t *o = g + t * HD + c;
                for (int j = 0; j < 16; j++) {
                    kvt_st16(o + j, kvt_narrow((float)(q[j] & 15) * s[j] + m[j], dtype));
                    kvt_st16(o + j + 16, kvt_narrow((float)(q[j] >> 4) * s[j + 16] + m[j + 16], dtype));
                }
            }
        }
        src += 4 * HD + nt * HD / 2;
    }
    return 0;
}

size_t kvt_tq_encode_scalar(const void *, size_t, size_t, int, int, const uint8_t *, size_t, uint8_t *);
int kvt_tq_decode_scalar(const uint8_t *, size_t, size_t, int, int, const uint8_t *, size_t, void *);
size_t kvt_tq_means_scalar(const uint16_t *, size_t, size_t, size_t, int, uint8_t *);

const kvt_impl kvt_impl_scalar = {
    s_f16_to_f32, s_f32_to_f16, s_bf16_to_f32, s_f32_to_bf16, s_count_nonfinite,
    s_shuffle2, s_unshuffle2,
    s_q8_encode, s_q8_decode,
    s_k4v4_encode_keys, s_k4v4_decode_keys, s_k4v4_encode_values, s_k4v4_decode_values,
    kvt_tq_encode_scalar, kvt_tq_decode_scalar, kvt_tq_means_scalar,
};
