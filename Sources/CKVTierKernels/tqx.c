/* tqx.c - the sub-3-bit tq parts (tq3s, tq2s): a page's leading tokens kept as given, an optional
 * per-channel mean, mixed 2/3/4-bit Lloyd-Max codes after the random-sign Hadamard rotation, and
 * a one-byte log-scale alpha per vector against one fp16 maximum per head. Layout:
 * docs/codec-layouts.md ("tqx parts"). Scalar only: these codecs are chosen for size, and the
 * decode (a table look-up, the transform, one add) stays far faster than a disk read.
 */
#include "internal.h"
#include <math.h>

/* 2^(-j/16) for j = 0...15, float32 correctly rounded; log8 scale q stands for
 * 2^((q - 255) / 16) = R[(255 - q) % 16] * 2^-((255 - q) / 16). */
static const float kR16[16] = {
    0x1.000000p+0f, 0x1.ea4afap-1f, 0x1.d5818ep-1f, 0x1.c199bep-1f, 0x1.ae89fap-1f, 0x1.9c4918p-1f,
    0x1.8ace54p-1f, 0x1.7a1148p-1f, 0x1.6a09e6p-1f, 0x1.5ab07ep-1f, 0x1.4bfdaep-1f, 0x1.3dea64p-1f,
    0x1.306fe0p-1f, 0x1.2387a6p-1f, 0x1.172b84p-1f, 0x1.0b5586p-1f,
};

KVT_INLINE float log8_factor(unsigned q) {
    if (q == 0) return 0.0f;
    unsigned e = 255u - q;
    return ldexpf(kR16[e & 15u], -(int)(e >> 4));
}

/* The q in 1...255 whose amax * factor(q) is nearest to a > 0 (ties to the smaller q). */
static uint8_t log8_encode(float a, float amax) {
    if (!(a > 0.0f) || !(amax > 0.0f)) return 0;
    float r = a / amax;
    int q0 = 255 + (int)floorf(16.0f * log2f(r) + 0.5f);
    int best = 0;
    float bestd = INFINITY;
    for (int q = q0 - 1; q <= q0 + 1; q++) {
        if (q < 1 || q > 255) continue;
        float d = fabsf(amax * log8_factor((unsigned)q) - a);
        if (d < bestd) { bestd = d; best = q; }
    }
    if (best == 0) best = q0 < 1 ? 1 : 255;
    return (uint8_t)best;
}

static int spec_ok(size_t D, int bits, int half) {
    return (bits == 2 || bits == 3) && (half == 0 || half == 1) && (D == 32 || D == 64 || D == 128 || D == 256);
}

KVT_INLINE size_t vector_bytes(size_t D, int bits, int half) { return 1 + D / 32 * kvt_block_bytes(bits, half); }

size_t kvt_tqx_part_size(size_t T, size_t H, size_t D, int bits, int half, int center, size_t exact) {
    if (!spec_ok(D, bits, half)) return 0;
    size_t e = exact < T ? exact : T;
    return e * H * D * 2 + (center ? H * D * 2 : 0) + H * 2 + (T - e) * H * vector_bytes(D, bits, half);
}

/* Codebook (index bits - 2 of the tq tables) of coordinate i. */
KVT_INLINE int book(size_t i, int bits, int half) { return bits - 2 + (half && (i & 31) < 16); }

/* Codes of u[D] into out (the vector's blocks) and its alpha (>= 0, may be +Inf for huge u). */
static float encode_vec(const kvt_tq_tables *tb, const float *u, size_t D, int bits, int half, int proj,
                        uint8_t *out) {
    float y[256];
    uint8_t code[256];
    for (size_t i = 0; i < D; i++) y[i] = tb->sign[i] * u[i];
    kvt_fwht(y, D);
    float ss = 0.0f;
    for (size_t i = 0; i < D; i++) ss += y[i] * y[i];
    float rms = sqrtf(ss / (float)D);
    float a = 0.0f;
    if (rms == 0.0f) {
        for (size_t i = 0; i < D; i++) code[i] = (uint8_t)(2 << book(i, bits, half)); /* level index 2^(bits - 1) */
    } else {
        float num = 0.0f, den = 0.0f;
        for (size_t i = 0; i < D; i++) {
            int b = book(i, bits, half), nb = (4 << b) - 1;
            float z = y[i] / rms;
            int c = 0;
            for (int k = 0; k < nb; k++) c += tb->bnd[b][k] <= z;
            code[i] = (uint8_t)c;
            num += y[i] * tb->lev[b][c];
            den += tb->lev2[b][c];
        }
        a = proj ? ss / num : num / den;
    }
    for (size_t blk = 0; blk < D / 32; blk++)
        kvt_pack_block(code + 32 * blk, bits, half, out + blk * kvt_block_bytes(bits, half));
    return a;
}

static void decode_vec(const kvt_tq_tables *tb, const uint8_t *in, size_t D, int bits, int half, float a,
                       float *x) {
    uint8_t code[256];
    for (size_t blk = 0; blk < D / 32; blk++)
        kvt_unpack_block(in + blk * kvt_block_bytes(bits, half), bits, half, code + 32 * blk);
    const float *lo = tb->lev[bits - 2], *hi = tb->lev[bits - 2 + half];
    for (size_t i = 0; i < D; i += 32) {
        for (size_t j = 0; j < 16; j++) x[i + j] = a * hi[code[i + j]];
        for (size_t j = 16; j < 32; j++) x[i + j] = a * lo[code[i + j]];
    }
    kvt_fwht(x, D);
    float invD = 1.0f / (float)D; /* a power of two: x * invD == x / D */
    for (size_t i = 0; i < D; i++) x[i] = tb->sign[i] * x[i] * invD;
}

size_t kvt_tqx_encode(const uint16_t *src, size_t T, size_t H, size_t D, int dtype, int bits, int half, int center,
                      int proj, size_t exact, float *scratch, uint8_t *dst) {
    if ((dtype != KVT_F16 && dtype != KVT_BF16) || !spec_ok(D, bits, half)) return SIZE_MAX;
    const kvt_tq_tables *tb = kvt_tq_get_tables();
    size_t HD = H * D, e = exact < T ? exact : T, n = T - e, vb = vector_bytes(D, bits, half);
    uint16_t nf = kvt_nf(dtype);
    size_t fails = 0;
    for (size_t i = 0; i < T * HD; i++) fails += (kvt_ld16(src + i) & nf) == nf;
    if (fails) return fails;
    /* Leading tokens as given (little-endian 16-bit elements). */
    for (size_t i = 0; i < e * HD; i++) kvt_put_le16(dst + 2 * i, kvt_ld16(src + i));
    uint8_t *mean = dst + e * HD * 2;
    uint8_t *amax = mean + (center ? HD * 2 : 0);
    uint8_t *vec = amax + H * 2;
    for (size_t h = 0; h < H; h++) {
        float mf[256];
        for (size_t d = 0; d < D; d++) mf[d] = 0.0f;
        if (center) {
            float acc[256];
            for (size_t d = 0; d < D; d++) acc[d] = 0.0f;
            for (size_t t = e; t < T; t++)
                for (size_t d = 0; d < D; d++) acc[d] += kvt_widen(kvt_ld16(src + t * HD + h * D + d), dtype);
            for (size_t d = 0; d < D; d++) {
                uint16_t m = n ? kvt_f2h(acc[d] / (float)n) : 0;
                fails += kvt_h_nonfinite(m);
                kvt_put_le16(mean + 2 * (h * D + d), m);
                mf[d] = kvt_h2f(m);
            }
            if (fails) continue;
        }
        float top = 0.0f;
        for (size_t t = e; t < T; t++) {
            float u[256];
            for (size_t d = 0; d < D; d++) u[d] = kvt_widen(kvt_ld16(src + t * HD + h * D + d), dtype) - mf[d];
            uint8_t *v = vec + ((t - e) * H + h) * vb;
            float a = encode_vec(tb, u, D, bits, half, proj, v + 1);
            scratch[t - e] = a;
            if (a > top || a != a) top = a;
        }
        uint16_t ab = kvt_f2h(top);
        kvt_put_le16(amax + 2 * h, ab);
        if (kvt_h_nonfinite(ab)) { fails++; continue; }
        float af = kvt_h2f(ab);
        for (size_t t = e; t < T; t++) vec[((t - e) * H + h) * vb] = log8_encode(scratch[t - e], af);
    }
    return fails;
}

int kvt_tqx_decode(const uint8_t *src, size_t T, size_t H, size_t D, int dtype, int bits, int half, int center,
                   size_t exact, uint16_t *dst) {
    if ((dtype != KVT_F16 && dtype != KVT_BF16) || !spec_ok(D, bits, half)) return -1;
    const kvt_tq_tables *tb = kvt_tq_get_tables();
    size_t HD = H * D, e = exact < T ? exact : T, vb = vector_bytes(D, bits, half);
    const uint8_t *mean = src + e * HD * 2;
    const uint8_t *amax = mean + (center ? HD * 2 : 0);
    const uint8_t *vec = amax + H * 2;
    if (center)
        for (size_t i = 0; i < HD; i++)
            if (kvt_h_nonfinite(kvt_le16(mean + 2 * i))) return 1;
    for (size_t h = 0; h < H; h++)
        if (kvt_bad_scale(kvt_le16(amax + 2 * h))) return 1;
    uint16_t nf = kvt_nf(dtype);
    for (size_t i = 0; i < e * HD; i++) { /* the encoder never stores a non-finite element */
        uint16_t b = kvt_le16(src + 2 * i);
        if ((b & nf) == nf) return 1;
        kvt_st16(dst + i, b);
    }
    for (size_t h = 0; h < H; h++) { /* head-major: the mean is widened once per head */
        float mf[256];
        for (size_t d = 0; d < D; d++) mf[d] = center ? kvt_h2f(kvt_le16(mean + 2 * (h * D + d))) : 0.0f;
        float am = kvt_h2f(kvt_le16(amax + 2 * h));
        for (size_t t = e; t < T; t++) {
            const uint8_t *v = vec + ((t - e) * H + h) * vb;
            float x[256];
            decode_vec(tb, v + 1, D, bits, half, am * log8_factor(v[0]), x);
            if (center)
                for (size_t d = 0; d < D; d++) x[d] = x[d] + mf[d];
            /* The dispatched conversions (F16C / AVX-512 where the CPU has them) round exactly
             * like kvt_narrow. */
            if (dtype == KVT_F16) kvt_f32_to_f16(x, D, dst + t * HD + h * D);
            else kvt_f32_to_bf16(x, D, dst + t * HD + h * D);
        }
    }
    return 0;
}
