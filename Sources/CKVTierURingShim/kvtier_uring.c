// liburing calls behind kvtier_uring.h; see that header for why this file exists.
#define _GNU_SOURCE  // O_DIRECT

#include "kvtier_uring.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdlib.h>

struct kvt_uring {
    struct io_uring ring;
};

int kvt_uring_create(uint32_t entries, kvt_uring **out) {
    kvt_uring *ring = calloc(1, sizeof *ring);
    if (!ring) return -ENOMEM;
    int status = io_uring_queue_init(entries, &ring->ring, IORING_SETUP_SUBMIT_ALL);
    if (status == -EINVAL) status = io_uring_queue_init(entries, &ring->ring, 0);
    if (status < 0) {
        free(ring);
        return status;
    }
    *out = ring;
    return 0;
}

void kvt_uring_destroy(kvt_uring *ring) {
    io_uring_queue_exit(&ring->ring);
    free(ring);
}

uint32_t kvt_uring_sq_entries(const kvt_uring *ring) { return ring->ring.sq.ring_entries; }
uint32_t kvt_uring_cq_entries(const kvt_uring *ring) { return ring->ring.cq.ring_entries; }

int kvt_uring_supports_read(kvt_uring *ring) {
    struct io_uring_probe *probe = io_uring_get_probe_ring(&ring->ring);
    if (!probe) return 0;
    int supported = io_uring_opcode_supported(probe, IORING_OP_READ);
    io_uring_free_probe(probe);
    return supported ? 1 : 0;
}

int kvt_uring_prep_read(kvt_uring *ring, int fd, void *buffer, uint32_t length, uint64_t offset, uint64_t user_data) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_read(sqe, fd, buffer, length, offset);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int kvt_uring_prep_nop(kvt_uring *ring, uint64_t user_data) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_nop(sqe);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int kvt_uring_prep_cancel_all(kvt_uring *ring, uint64_t user_data) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ALL | IORING_ASYNC_CANCEL_ANY);
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int kvt_uring_submit(kvt_uring *ring) { return io_uring_submit(&ring->ring); }

uint32_t kvt_uring_sq_ready(const kvt_uring *ring) { return io_uring_sq_ready(&ring->ring); }

int kvt_uring_wait(kvt_uring *ring) {
    struct io_uring_cqe *cqe = NULL;
    return io_uring_wait_cqe(&ring->ring, &cqe);
}

uint32_t kvt_uring_reap(kvt_uring *ring, kvt_uring_completion *out, uint32_t capacity) {
    struct io_uring_cqe *cqe;
    unsigned head;
    uint32_t count = 0;
    io_uring_for_each_cqe(&ring->ring, head, cqe) {
        if (count == capacity) break;
        out[count].user_data = cqe->user_data;
        out[count].res = cqe->res;
        out[count].flags = cqe->flags;
        count++;
    }
    io_uring_cq_advance(&ring->ring, count);
    return count;
}

int kvt_open_flag_direct(void) { return O_DIRECT; }
