/*
 * kvtier_blake2b.h - BLAKE2b (RFC 7693), unkeyed, digest 1..64 bytes.
 *
 * Page keys are a BLAKE2b-128 hash chain over the model and the page's tokens, so any client
 * (Python's hashlib.blake2b(digest_size=16) included) can derive them.
 */
#ifndef KVTIER_BLAKE2B_H
#define KVTIER_BLAKE2B_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Incremental state; initialize with kvt_blake2b_init. */
typedef struct kvt_blake2b_state {
    uint64_t h[8];
    uint64_t t[2];
    uint8_t buffer[128];
    size_t buffered;
    size_t digest_length;
} kvt_blake2b_state;

/** Starts a hash with a digest of `digest_length` bytes (1...64); returns -1 if out of range. */
int kvt_blake2b_init(kvt_blake2b_state *state, size_t digest_length);
/** Adds `length` bytes. */
void kvt_blake2b_update(kvt_blake2b_state *state, const void *data, size_t length);
/** Writes the digest (digest_length bytes) to `out`. The state is spent afterwards. */
void kvt_blake2b_final(kvt_blake2b_state *state, uint8_t *out);

#ifdef __cplusplus
}
#endif

#endif /* KVTIER_BLAKE2B_H */
