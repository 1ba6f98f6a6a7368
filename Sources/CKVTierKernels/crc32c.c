/* crc32c.c - CRC-32C with the SSE4.2 instruction where available, a table elsewhere. */
#include "kvtier_crc32c.h"
#include <string.h>

static uint32_t g_table[8][256];
static int g_table_ready;

static void build_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1)));
        g_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int s = 1; s < 8; s++) g_table[s][i] = (g_table[s - 1][i] >> 8) ^ g_table[0][g_table[s - 1][i] & 0xFF];
    __atomic_store_n(&g_table_ready, 1, __ATOMIC_RELEASE);
}

/* Slicing-by-8 on the reflected polynomial; the state is the inverted CRC. */
static uint32_t crc_table(uint32_t state, const uint8_t *p, size_t n) {
    if (!__atomic_load_n(&g_table_ready, __ATOMIC_ACQUIRE)) build_table(); /* idempotent */
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        word ^= state;
        state = g_table[7][word & 0xFF] ^ g_table[6][(word >> 8) & 0xFF] ^ g_table[5][(word >> 16) & 0xFF] ^
                g_table[4][(word >> 24) & 0xFF] ^ g_table[3][(word >> 32) & 0xFF] ^
                g_table[2][(word >> 40) & 0xFF] ^ g_table[1][(word >> 48) & 0xFF] ^ g_table[0][word >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) state = (state >> 8) ^ g_table[0][(state ^ *p++) & 0xFF];
    return state;
}

#if defined(__x86_64__)
#include <nmmintrin.h>

__attribute__((target("sse4.2"))) static uint32_t crc_sse42(uint32_t state, const uint8_t *p, size_t n) {
    uint64_t s = state;
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        s = _mm_crc32_u64(s, word);
        p += 8;
        n -= 8;
    }
    uint32_t s32 = (uint32_t)s;
    while (n--) s32 = _mm_crc32_u8(s32, *p++);
    return s32;
}

static int has_sse42(void) {
    static int cached = -1;
    int c = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (c < 0) {
        __builtin_cpu_init();
        c = __builtin_cpu_supports("sse4.2") ? 1 : 0;
        __atomic_store_n(&cached, c, __ATOMIC_RELAXED);
    }
    return c;
}
#endif

uint32_t kvt_crc32c(uint32_t crc, const void *data, size_t length) {
    const uint8_t *p = (const uint8_t *)data;
    uint32_t state = ~crc;
#if defined(__x86_64__)
    if (has_sse42()) return ~crc_sse42(state, p, length);
#endif
    return ~crc_table(state, p, length);
}

uint32_t kvt_crc32c_portable(uint32_t crc, const void *data, size_t length) {
    return ~crc_table(~crc, (const uint8_t *)data, length);
}
