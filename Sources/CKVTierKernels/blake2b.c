/* blake2b.c - BLAKE2b per RFC 7693 (unkeyed), written for KVTier's page-key chain. */
#include "kvtier_blake2b.h"
#include <string.h>

static const uint64_t IV[8] = {
    0x6A09E667F3BCC908ULL, 0xBB67AE8584CAA73BULL, 0x3C6EF372FE94F82BULL, 0xA54FF53A5F1D36F1ULL,
    0x510E527FADE682D1ULL, 0x9B05688C2B3E6C1FULL, 0x1F83D9ABFB41BD6BULL, 0x5BE0CD19137E2179ULL,
};

static const uint8_t SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

static uint64_t rotr(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

static uint64_t load64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

#define MIX(a, b, c, d, x, y)            \
    do {                                 \
        v[a] = v[a] + v[b] + (x);        \
        v[d] = rotr(v[d] ^ v[a], 32);    \
        v[c] = v[c] + v[d];              \
        v[b] = rotr(v[b] ^ v[c], 24);    \
        v[a] = v[a] + v[b] + (y);        \
        v[d] = rotr(v[d] ^ v[a], 16);    \
        v[c] = v[c] + v[d];              \
        v[b] = rotr(v[b] ^ v[c], 63);    \
    } while (0)

static void compress(kvt_blake2b_state *s, const uint8_t block[128], int last) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++) m[i] = load64(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = s->h[i];
        v[i + 8] = IV[i];
    }
    v[12] ^= s->t[0];
    v[13] ^= s->t[1];
    if (last) v[14] = ~v[14];
    for (int r = 0; r < 12; r++) {
        const uint8_t *z = SIGMA[r];
        MIX(0, 4, 8, 12, m[z[0]], m[z[1]]);
        MIX(1, 5, 9, 13, m[z[2]], m[z[3]]);
        MIX(2, 6, 10, 14, m[z[4]], m[z[5]]);
        MIX(3, 7, 11, 15, m[z[6]], m[z[7]]);
        MIX(0, 5, 10, 15, m[z[8]], m[z[9]]);
        MIX(1, 6, 11, 12, m[z[10]], m[z[11]]);
        MIX(2, 7, 8, 13, m[z[12]], m[z[13]]);
        MIX(3, 4, 9, 14, m[z[14]], m[z[15]]);
    }
    for (int i = 0; i < 8; i++) s->h[i] ^= v[i] ^ v[i + 8];
}

static void count(kvt_blake2b_state *s, uint64_t n) {
    s->t[0] += n;
    if (s->t[0] < n) s->t[1]++;
}

int kvt_blake2b_init(kvt_blake2b_state *s, size_t digest_length) {
    if (digest_length < 1 || digest_length > 64) return -1;
    memset(s, 0, sizeof *s);
    for (int i = 0; i < 8; i++) s->h[i] = IV[i];
    s->h[0] ^= 0x01010000ULL ^ (uint64_t)digest_length; /* fanout 1, depth 1, no key */
    s->digest_length = digest_length;
    return 0;
}

void kvt_blake2b_update(kvt_blake2b_state *s, const void *data, size_t length) {
    const uint8_t *p = (const uint8_t *)data;
    while (length > 0) {
        /* The last block is compressed in final, so only compress when more input follows. */
        if (s->buffered == 128) {
            count(s, 128);
            compress(s, s->buffer, 0);
            s->buffered = 0;
        }
        size_t take = 128 - s->buffered;
        if (take > length) take = length;
        memcpy(s->buffer + s->buffered, p, take);
        s->buffered += take;
        p += take;
        length -= take;
    }
}

void kvt_blake2b_final(kvt_blake2b_state *s, uint8_t *out) {
    count(s, s->buffered);
    memset(s->buffer + s->buffered, 0, 128 - s->buffered);
    compress(s, s->buffer, 1);
    for (size_t i = 0; i < s->digest_length; i++) out[i] = (uint8_t)(s->h[i / 8] >> (8 * (i % 8)));
}
