/* tq.c - random-sign Hadamard rotation + Lloyd-Max codebook (tq2/tq3/tq4, tqm): tables, the
 * portable scalar path, and the exact failure counts shared by every path.
 * The SIMD paths are avx2_tq.c and avx512_tq.c.
 */
#include "internal.h"
#include <math.h>

/* sign[i] = -1 where bit i is set: SplitMix64 seeded 0x6B76746965720001, top bit. */
static const uint64_t kSignMask[4] = {0xeba4287cd91dc99dULL, 0xf0f3ce4b368c0ca3ULL,
                                      0xfcbd0302b5338645ULL, 0x3d5322da82adbf0bULL};

static const float kLev2[4] = {-1.5104176f, -0.4527800f, 0.4527800f, 1.5104176f};
static const float kLev3[8] = {-2.1519456f, -1.3439093f, -0.7560053f, -0.2450942f,
                               0.2450942f,  0.7560053f,  1.3439093f,  2.1519456f};
static const float kLev4[16] = {-2.7325895f, -2.0690172f, -1.6180464f, -1.2562312f,
                                -0.9423404f, -0.6567591f, -0.3880483f, -0.1283950f,
                                0.1283950f,  0.3880483f,  0.6567591f,  0.9423404f,
                                1.2562312f,  1.6180464f,  2.0690172f,  2.7325895f};

static kvt_tq_tables g_tables;
static int g_tables_ready; /* written once under the lock below */

static void build_tables(kvt_tq_tables *t) {
    for (int i = 0; i < 256; i++) {
        int neg = (kSignMask[i >> 6] >> (i & 63)) & 1;
        t->sign[i] = neg ? -1.0f : 1.0f;
        t->sbit[i] = neg ? 0x80000000u : 0u;
        for (int k = 0; k < 4; k++) t->signd[k][i] = t->sign[i] / (float)(32 << k);
    }
    const float *levs[3] = {kLev2, kLev3, kLev4};
    for (int b = 0; b < 3; b++) {
        int n = 4 << b;
        for (int k = 0; k < 16; k++) {
            t->lev[b][k] = k < n ? levs[b][k] : 0.0f;
            t->levr[b][k] = levs[b][k % n];
            t->lev2[b][k] = t->lev[b][k] * t->lev[b][k];
            t->bnd[b][k] = k < n - 1 ? (levs[b][k] + levs[b][k + 1]) / 2.0f : INFINITY;
        }
        for (int j = 0; j < 8; j++) {
            t->pos[b][j] = j < n / 2 - 1 ? t->bnd[b][n / 2 + j] : INFINITY;
            t->mag[b][j] = j < n / 2 ? levs[b][n / 2 + j] : 0.0f;
        }
    }
}

const kvt_tq_tables *kvt_tq_get_tables(void) {
    if (!__atomic_load_n(&g_tables_ready, __ATOMIC_ACQUIRE)) {
        static int lock;
        while (__atomic_exchange_n(&lock, 1, __ATOMIC_ACQUIRE)) {}
        if (!g_tables_ready) {
            build_tables(&g_tables);
            __atomic_store_n(&g_tables_ready, 1, __ATOMIC_RELEASE);
        }
        __atomic_store_n(&lock, 0, __ATOMIC_RELEASE);
    }
    return &g_tables;
}

KVT_INLINE float kvt_sqrtf(float v) {
#if defined(__has_builtin) && __has_builtin(__builtin_elementwise_sqrt)
    return __builtin_elementwise_sqrt(v); /* no errno, no libm call */
#else
    return sqrtf(v);
#endif
}

static void pack_codes(const uint8_t *c, size_t D, int bits, uint8_t *out) {
    for (size_t b = 0; b < D; b += 32, c += 32) {
        if (bits == 4) {
            for (int i = 0; i < 16; i++) *out++ = (uint8_t)(c[i] | c[i + 16] << 4);
        } else {
            kvt_pack_block(c, bits, 0, out);
            out += kvt_block_bytes(bits, 0);
        }
    }
}

static void unpack_codes(const uint8_t *in, size_t D, int bits, uint8_t *c) {
    for (size_t b = 0; b < D; b += 32, c += 32) {
        if (bits == 4) {
            for (int i = 0; i < 16; i++) { c[i] = in[i] & 15; c[i + 16] = in[i] >> 4; }
            in += 16;
        } else {
            kvt_unpack_block(in, bits, 0, c);
            in += kvt_block_bytes(bits, 0);
        }
    }
}

/* Encode one vector x[D] (finite): writes [alpha][codes] and returns alpha's fp16 bits. */
static uint16_t tq_encode_vec(const kvt_tq_tables *tb, const float *x, size_t D, int bits, uint8_t *out) {
    float y[256];
    uint8_t code[256];
    for (size_t i = 0; i < D; i++) y[i] = tb->sign[i] * x[i];
    kvt_fwht(y, D);
    float ss = 0.0f;
    for (size_t i = 0; i < D; i++) ss += y[i] * y[i];
    float rms = kvt_sqrtf(ss / (float)D);
    uint16_t ab;
    const float *lev = tb->lev[bits - 2], *bnd = tb->bnd[bits - 2], *lev2 = tb->lev2[bits - 2];
    int nb = (1 << bits) - 1;
    if (rms == 0.0f) {
        for (size_t i = 0; i < D; i++) code[i] = (uint8_t)(1 << (bits - 1));
        ab = 0;
    } else {
        float num = 0.0f, den = 0.0f;
        for (size_t i = 0; i < D; i++) {
            float z = y[i] / rms;
            int c = 0;
            for (int k = 0; k < nb; k++) c += bnd[k] <= z;
            code[i] = (uint8_t)c;
            num += y[i] * lev[c];
            den += lev2[c];
        }
        ab = kvt_f2h(num / den);
    }
    kvt_put_le16(out, ab);
    pack_codes(code, D, bits, out + 2);
    return ab;
}

/* Decode one vector: returns 0, or 1 for a non-finite alpha. mean: NULL or D fp16 (tqm). */
static int tq_decode_vec(const kvt_tq_tables *tb, const uint8_t *in, size_t D, int bits, const uint8_t *mean,
                         float *x) {
    uint16_t ab = kvt_le16(in);
    if (kvt_h_nonfinite(ab)) return 1;
    float a = kvt_h2f(ab);
    uint8_t code[256];
    unpack_codes(in + 2, D, bits, code);
    const float *lev = tb->lev[bits - 2];
    for (size_t i = 0; i < D; i++) x[i] = a * lev[code[i]];
    kvt_fwht(x, D);
    float invD = 1.0f / (float)D; /* exact power of two: x*invD == x/D */
    for (size_t i = 0; i < D; i++) x[i] = tb->sign[i] * x[i] * invD;
    if (mean)
        for (size_t i = 0; i < D; i++) x[i] = x[i] + kvt_h2f(kvt_le16(mean + 2 * i));
    return 0;
}

/* Vector v of a part (dtype 0 = float32) widened, minus the fp16 mean when given. */
static void load_vec(const void *src, size_t v, size_t D, int dtype, const uint8_t *mean, float *x) {
    for (size_t i = 0; i < D; i++) {
        float f = dtype == 0 ? kvt_ldf((const float *)src + v * D + i)
                             : kvt_widen(kvt_ld16((const uint16_t *)src + v * D + i), dtype);
        x[i] = mean ? f - kvt_h2f(kvt_le16(mean + 2 * i)) : f;
    }
}

KVT_INLINE size_t nonfinite_f32(const float *x, size_t n) {
    size_t c = 0;
    for (size_t i = 0; i < n; i++) c += (kvt_fbits(x[i]) & 0x7F800000u) == 0x7F800000u;
    return c;
}

/* tq: non-finite elements of each vector, else 1 if its fp16 alpha is not finite. */
size_t kvt_tq_fail(const void *src, size_t vectors, size_t D, int bits, int dtype) {
    const kvt_tq_tables *tb = kvt_tq_get_tables();
    size_t fails = 0;
    float x[256];
    uint8_t tmp[2 + 128];
    for (size_t v = 0; v < vectors; v++) {
        load_vec(src, v, D, dtype, NULL, x);
        size_t bad = nonfinite_f32(x, D);
        if (bad == 0) bad = kvt_h_nonfinite(tq_encode_vec(tb, x, D, bits, tmp));
        fails += bad;
    }
    return fails;
}

/* tqm: non-finite elements; + 1 per mean of an all-finite column that is not finite in fp16;
 * + 1 per vector of a head whose D means are all finite whose fp16 alpha is not finite. */
size_t kvt_tqm_fail(const uint16_t *src, size_t T, size_t H, size_t D, int bits, int dtype) {
    const kvt_tq_tables *tb = kvt_tq_get_tables();
    size_t fails = 0, HD = H * D;
    float acc[256], x[256];
    uint8_t colbad[256], mean[512], tmp[2 + 128];
    for (size_t h = 0; h < H; h++) {
        for (size_t d = 0; d < D; d++) { acc[d] = 0.0f; colbad[d] = 0; }
        for (size_t t = 0; t < T; t++)
            for (size_t d = 0; d < D; d++) {
                uint16_t b = kvt_ld16(src + t * HD + h * D + d);
                if ((b & kvt_nf(dtype)) == kvt_nf(dtype)) { fails++; colbad[d] = 1; }
                else acc[d] += kvt_widen(b, dtype);
            }
        int head_ok = 1;
        for (size_t d = 0; d < D; d++) {
            uint16_t m = kvt_f2h(acc[d] / (float)T);
            kvt_put_le16(mean + 2 * d, m);
            if (colbad[d]) head_ok = 0;
            else if (kvt_h_nonfinite(m)) { fails++; head_ok = 0; }
        }
        if (!head_ok) continue;
        for (size_t t = 0; t < T; t++) {
            load_vec(src, t * H + h, D, dtype, mean, x);
            fails += kvt_h_nonfinite(tq_encode_vec(tb, x, D, bits, tmp));
        }
    }
    return fails;
}

/* ---------------- scalar path ---------------- */

size_t kvt_tq_encode_scalar(const void *src, size_t vectors, size_t D, int bits, int dtype, const uint8_t *mean,
                            size_t H, uint8_t *dst) {
    const kvt_tq_tables *tb = kvt_tq_get_tables();
    size_t vs = 2 + D * (size_t)bits / 8, h = 0;
    float x[256];
    for (size_t v = 0; v < vectors; v++, dst += vs) {
        load_vec(src, v, D, dtype, mean ? mean + 2 * h * D : NULL, x);
        if (++h == H) h = 0;
        if (kvt_h_nonfinite(tq_encode_vec(tb, x, D, bits, dst))) return 1; /* also catches non-finite x */
    }
    return 0;
}

int kvt_tq_decode_scalar(const uint8_t *src, size_t vectors, size_t D, int bits, int dtype, const uint8_t *mean,
                         size_t H, void *dst) {
    const kvt_tq_tables *tb = kvt_tq_get_tables();
    size_t vs = 2 + D * (size_t)bits / 8, h = 0;
    float x[256];
    for (size_t v = 0; v < vectors; v++, src += vs) {
        if (tq_decode_vec(tb, src, D, bits, mean ? mean + 2 * h * D : NULL, x)) return 1;
        if (++h == H) h = 0;
        for (size_t i = 0; i < D; i++) {
            if (dtype == 0) kvt_stf((float *)dst + v * D + i, x[i]);
            else kvt_st16((uint16_t *)dst + v * D + i, kvt_narrow(x[i], dtype));
        }
    }
    return 0;
}

size_t kvt_tq_means_scalar(const uint16_t *src, size_t T, size_t H, size_t D, int dtype, uint8_t *dst) {
    size_t HD = H * D, bad = 0;
    float acc[1024];
    for (size_t c0 = 0; c0 < HD; c0 += 1024) {
        size_t n = HD - c0 < 1024 ? HD - c0 : 1024;
        for (size_t i = 0; i < n; i++) acc[i] = 0.0f;
        for (size_t t = 0; t < T; t++)
            for (size_t i = 0; i < n; i++) acc[i] += kvt_widen(kvt_ld16(src + t * HD + c0 + i), dtype);
        for (size_t i = 0; i < n; i++) {
            uint16_t m = kvt_f2h(acc[i] / (float)T);
            kvt_put_le16(dst + 2 * (c0 + i), m);
            bad += kvt_h_nonfinite(m);
        }
    }
    return bad;
}
