/* dispatch.c - run-time CPU dispatch and the public entry points (argument checks). */
#include "internal.h"
#include <stdint.h>

static int g_cpu = -1;   /* best level, computed once */
static int g_level = -1; /* level in force */

static int detect(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return KVT_LEVEL_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return KVT_LEVEL_AVX2;
#endif
    return KVT_LEVEL_SCALAR;
}

int kvt_cpu_level(void) {
    int c = __atomic_load_n(&g_cpu, __ATOMIC_RELAXED);
    if (c < 0) {
        c = detect(); /* idempotent: racing threads store the same value */
        __atomic_store_n(&g_cpu, c, __ATOMIC_RELAXED);
    }
    return c;
}

int kvt_set_level(int level) {
    int c = kvt_cpu_level();
    if (level < 0) level = 0;
    if (level > c) level = c;
    __atomic_store_n(&g_level, level, __ATOMIC_RELAXED);
    return level;
}

int kvt_get_level(void) {
    int l = __atomic_load_n(&g_level, __ATOMIC_RELAXED);
    if (l < 0) {
        int c = kvt_cpu_level();
        int expected = -1;
        __atomic_compare_exchange_n(&g_level, &expected, c, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
        l = __atomic_load_n(&g_level, __ATOMIC_RELAXED);
    }
    return l;
}

static const kvt_impl *impl(void) {
#if defined(__x86_64__)
    switch (kvt_get_level()) {
    case KVT_LEVEL_AVX512: return &kvt_impl_avx512;
    case KVT_LEVEL_AVX2: return &kvt_impl_avx2;
    default: break;
    }
#endif
    return &kvt_impl_scalar;
}

static int dtype_ok(int d) { return d == KVT_F16 || d == KVT_BF16; }

/* ---- conversions, shuffle ---- */
void kvt_f16_to_f32(const uint16_t *src, size_t n, float *dst) { impl()->f16_to_f32(src, n, dst); }
void kvt_f32_to_f16(const float *src, size_t n, uint16_t *dst) { impl()->f32_to_f16(src, n, dst); }
void kvt_bf16_to_f32(const uint16_t *src, size_t n, float *dst) { impl()->bf16_to_f32(src, n, dst); }
void kvt_f32_to_bf16(const float *src, size_t n, uint16_t *dst) { impl()->f32_to_bf16(src, n, dst); }
size_t kvt_count_nonfinite(const uint16_t *src, size_t n, int dtype) {
    return dtype_ok(dtype) ? impl()->count_nonfinite(src, n, kvt_nf(dtype)) : 0;
}
void kvt_shuffle2(const uint8_t *src, size_t n, uint8_t *dst) { impl()->shuffle2(src, n, dst); }
void kvt_unshuffle2(const uint8_t *src, size_t n, uint8_t *dst) { impl()->unshuffle2(src, n, dst); }

/* ---- q8 ---- */
size_t kvt_q8_part_size(size_t T, size_t H, size_t D) { return T * H * (D + 2); }
size_t kvt_q8_encode(const uint16_t *src, size_t T, size_t H, size_t D, int dtype, uint8_t *dst) {
    if (!dtype_ok(dtype)) return SIZE_MAX;
    if (T * H == 0) return 0;
    return impl()->q8_encode(src, T, H, D, dtype, dst);
}
int kvt_q8_decode(const uint8_t *src, size_t T, size_t H, size_t D, int dtype, uint16_t *dst) {
    if (!dtype_ok(dtype)) return -1;
    if (T * H == 0) return 0;
    return impl()->q8_decode(src, T, H, D, dtype, dst);
}

/* ---- k4v4 ---- */
size_t kvt_k4v4_keys_size(size_t T, size_t H, size_t D) {
    if (D % 32) return 0;
    return (T + 31) / 32 * H * D * 4 + T * H * D / 2;
}
size_t kvt_k4v4_values_size(size_t T, size_t H, size_t D) {
    if (D % 32) return 0;
    return T * H * (D / 32) * 20;
}
size_t kvt_k4v4_encode_keys(const uint16_t *src, size_t T, size_t H, size_t D, int dtype, uint8_t *dst) {
    if (!dtype_ok(dtype) || D % 32) return SIZE_MAX;
    if (T * H * D == 0) return 0;
    return impl()->k4v4_encode_keys(src, T, H, D, dtype, dst);
}
int kvt_k4v4_decode_keys(const uint8_t *src, size_t T, size_t H, size_t D, int dtype, uint16_t *dst) {
    if (!dtype_ok(dtype) || D % 32) return -1;
    if (T * H * D == 0) return 0;
    return impl()->k4v4_decode_keys(src, T, H, D, dtype, dst);
}
size_t kvt_k4v4_encode_values(const uint16_t *src, size_t T, size_t H, size_t D, int dtype, uint8_t *dst) {
    if (!dtype_ok(dtype) || D % 32) return SIZE_MAX;
    if (T * H * D == 0) return 0;
    return impl()->k4v4_encode_values(src, T, H, D, dtype, dst);
}
int kvt_k4v4_decode_values(const uint8_t *src, size_t T, size_t H, size_t D, int dtype, uint16_t *dst) {
    if (!dtype_ok(dtype) || D % 32) return -1;
    if (T * H * D == 0) return 0;
    return impl()->k4v4_decode_values(src, T, H, D, dtype, dst);
}

/* ---- tq ---- */
static int tq_ok(size_t D, int bits) {
    return (bits == 2 || bits == 3 || bits == 4) && (D == 32 || D == 64 || D == 128 || D == 256);
}
size_t kvt_tq_vector_size(size_t D, int bits) { return tq_ok(D, bits) ? 2 + D * (size_t)bits / 8 : 0; }
size_t kvt_tq_encode(const uint16_t *src, size_t vectors, size_t D, int bits, int dtype, uint8_t *dst) {
    if (!dtype_ok(dtype) || !tq_ok(D, bits)) return SIZE_MAX;
    if (!vectors || !impl()->tq_encode(src, vectors, D, bits, dtype, NULL, 1, dst)) return 0;
    size_t f = kvt_tq_fail(src, vectors, D, bits, dtype);
    return f ? f : 1; /* a borderline alpha the exact recount rounds differently still fails */
}
int kvt_tq_decode(const uint8_t *src, size_t vectors, size_t D, int bits, int dtype, uint16_t *dst) {
    if (!dtype_ok(dtype) || !tq_ok(D, bits)) return -1;
    return vectors ? impl()->tq_decode(src, vectors, D, bits, dtype, NULL, 1, dst) : 0;
}
size_t kvt_tq_encode_f32(const float *src, size_t vectors, size_t D, int bits, uint8_t *dst) {
    if (!tq_ok(D, bits)) return SIZE_MAX;
    if (!vectors || !impl()->tq_encode(src, vectors, D, bits, 0, NULL, 1, dst)) return 0;
    size_t f = kvt_tq_fail(src, vectors, D, bits, 0);
    return f ? f : 1;
}
int kvt_tq_decode_f32(const uint8_t *src, size_t vectors, size_t D, int bits, float *dst) {
    if (!tq_ok(D, bits)) return -1;
    return vectors ? impl()->tq_decode(src, vectors, D, bits, 0, NULL, 1, dst) : 0;
}

/* ---- tqm: per-channel mean (fp16) + tq of the residuals ---- */
size_t kvt_tqm_part_size(size_t T, size_t H, size_t D, int bits) {
    return tq_ok(D, bits) ? H * D * 2 + T * H * (2 + D * (size_t)bits / 8) : 0;
}
size_t kvt_tqm_encode(const uint16_t *src, size_t T, size_t H, size_t D, int bits, int dtype, uint8_t *dst) {
    if (!dtype_ok(dtype) || !tq_ok(D, bits)) return SIZE_MAX;
    if (T * H == 0) return 0;
    const kvt_impl *I = impl();
    if (I->tq_means(src, T, H, D, dtype, dst) == 0 &&
        I->tq_encode(src, T * H, D, bits, dtype, dst, H, dst + H * D * 2) == 0)
        return 0;
    size_t f = kvt_tqm_fail(src, T, H, D, bits, dtype);
    return f ? f : 1;
}
int kvt_tqm_decode(const uint8_t *src, size_t T, size_t H, size_t D, int bits, int dtype, uint16_t *dst) {
    if (!dtype_ok(dtype) || !tq_ok(D, bits)) return -1;
    if (T * H == 0) return 0;
    const kvt_impl *I = impl();
    if (I->count_nonfinite((const uint16_t *)(const void *)src, H * D, KVT_NF_F16)) return 1;
    return I->tq_decode(src + H * D * 2, T * H, D, bits, dtype, src, H, dst);
}
