// Plain-C face of liburing for KVTierIO.
//
// Swift cannot import <liburing.h> next to Glibc and swift-system: liburing defines _GNU_SOURCE
// and _XOPEN_SOURCE and ships its own copy of <linux/io_uring.h>, so the same C structs arrive
// twice with different members and the Clang importer rejects the module. This header exposes
// only fixed-width integers and an opaque ring; the liburing calls live in kvtier_uring.c.
#ifndef KVTIER_URING_H
#define KVTIER_URING_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// An io_uring instance (liburing's struct io_uring), opaque to Swift.
typedef struct kvt_uring kvt_uring;

/// One reaped completion.
typedef struct kvt_uring_completion {
    uint64_t user_data;
    int32_t res;
    uint32_t flags;
} kvt_uring_completion;

/// Creates a ring with `entries` submission entries, without SQPOLL, asking for
/// IORING_SETUP_SUBMIT_ALL and retrying without it on EINVAL. Returns 0 or a negated errno.
int kvt_uring_create(uint32_t entries, kvt_uring **out);
/// Exits and frees the ring.
void kvt_uring_destroy(kvt_uring *ring);
/// Submission and completion queue sizes, as the kernel rounded them.
uint32_t kvt_uring_sq_entries(const kvt_uring *ring);
uint32_t kvt_uring_cq_entries(const kvt_uring *ring);
/// 1 when the kernel implements IORING_OP_READ, 0 when not or when it cannot say (before 5.6).
int kvt_uring_supports_read(kvt_uring *ring);

/// Prepare one entry; 0, or -EBUSY when the submission queue is full.
int kvt_uring_prep_read(kvt_uring *ring, int fd, void *buffer, uint32_t length, uint64_t offset, uint64_t user_data);
int kvt_uring_prep_nop(kvt_uring *ring, uint64_t user_data);
/// Cancels every request in flight (IORING_ASYNC_CANCEL_ALL | ANY, Linux 5.19+).
int kvt_uring_prep_cancel_all(kvt_uring *ring, uint64_t user_data);
/// io_uring_submit: entries submitted, or a negated errno.
int kvt_uring_submit(kvt_uring *ring);
/// Prepared entries not yet taken by the kernel.
uint32_t kvt_uring_sq_ready(const kvt_uring *ring);

/// Blocks until a completion is ready (io_uring_wait_cqe without consuming it): 0 or a negated errno.
int kvt_uring_wait(kvt_uring *ring);
/// Copies up to `capacity` ready completions into `out`, releases them, returns how many.
uint32_t kvt_uring_reap(kvt_uring *ring, kvt_uring_completion *out, uint32_t capacity);

/// The O_DIRECT open flag of this architecture (hidden from Swift behind _GNU_SOURCE).
int kvt_open_flag_direct(void);

#ifdef __cplusplus
}
#endif

#endif
