/*
 * kvtier_crc32c.h - CRC-32C (Castagnoli), the checksum of every page record and manifest.
 *
 * Polynomial 0x1EDC6F41 (reflected 0x82F63B78), initial value and final xor 0xFFFFFFFF: the
 * checksum of "123456789" is 0xE3069283. Uses the SSE4.2 crc32 instruction when the CPU has it,
 * a table otherwise; both give identical results.
 */
#ifndef KVTIER_CRC32C_H
#define KVTIER_CRC32C_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/**
 * Continues a checksum: pass 0 for the first chunk, then the previous result, so that
 * kvt_crc32c(kvt_crc32c(0, a, n), b, m) equals the checksum of a followed by b.
 */
uint32_t kvt_crc32c(uint32_t crc, const void *data, size_t length);

/** The table-driven path alone, whatever the CPU (tests compare it with kvt_crc32c). */
uint32_t kvt_crc32c_portable(uint32_t crc, const void *data, size_t length);

#ifdef __cplusplus
}
#endif

#endif /* KVTIER_CRC32C_H */
