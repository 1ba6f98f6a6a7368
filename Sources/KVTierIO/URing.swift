@preconcurrency import Glibc
import CKVTierURingShim
import SystemPackage

/// One io_uring instance, created without SQPOLL and torn down with the value.
///
/// The submission side (`prepare*`, `submit`) and the completion side (`waitForCompletion`,
/// `reap`) may be used by two different threads at once, each side by one thread at a time; that
/// is how liburing's rings are safe to share.
struct URing: ~Copyable {
    private let ring: OpaquePointer
    /// Where `reap` collects completions before handing them out.
    private let scratch: UnsafeMutableBufferPointer<kvt_uring_completion>
    /// Submission queue entries, as the kernel rounded them.
    let entries: Int
    /// Completion queue entries: the most completions one `reap` can return.
    let completionEntries: Int

    /// Creates a ring with `entries` submission entries (the kernel rounds up to a power of two).
    ///
    /// Asks for IORING_SETUP_SUBMIT_ALL (5.18+) so that one bad entry does not hold back the rest
    /// of a submission, and goes without it on kernels that refuse the flag.
    /// - Throws: the error of `io_uring_queue_init` — ENOSYS (kernel without io_uring), EPERM
    ///   (seccomp or `kernel.io_uring_disabled`), ENOMEM (memlock limit or memory).
    init(entries: Int) throws(Errno) {
        var created: OpaquePointer?
        let status = kvt_uring_create(UInt32(clamping: entries), &created)
        guard status == 0, let created else { throw Errno(rawValue: status < 0 ? -status : ENOMEM) }
        ring = created
        self.entries = Int(kvt_uring_sq_entries(created))
        completionEntries = Int(kvt_uring_cq_entries(created))
        scratch = .allocate(capacity: completionEntries)
        scratch.initialize(repeating: kvt_uring_completion())
    }

    deinit {
        scratch.deallocate()
        kvt_uring_destroy(ring)
    }

    /// Whether the kernel implements IORING_OP_READ; false when it cannot say (before 5.6, which
    /// also lacks the opcode).
    var supportsRead: Bool { kvt_uring_supports_read(ring) == 1 }

    // MARK: Submission side

    /// Prepares a read of `length` bytes at `offset` of `descriptor` into `destination`; false
    /// when the submission queue is full.
    func prepareRead(
        descriptor: CInt,
        destination: UnsafeMutableRawPointer,
        length: Int,
        offset: Int64,
        userData: UInt64
    ) -> Bool {
        kvt_uring_prep_read(
            ring, descriptor, destination, UInt32(clamping: length), UInt64(bitPattern: offset), userData
        ) == 0
    }

    /// Prepares a no-op whose completion carries `userData`.
    func prepareNoOperation(userData: UInt64) -> Bool {
        kvt_uring_prep_nop(ring, userData) == 0
    }

    /// Prepares a cancellation of every request in flight (Linux 5.19+; older kernels fail it with
    /// EINVAL, and the requests then simply complete).
    func prepareCancelAll(userData: UInt64) -> Bool {
        kvt_uring_prep_cancel_all(ring, userData) == 0
    }

    /// Hands every prepared entry to the kernel. Retries EINTR, and EAGAIN/EBUSY (the kernel is
    /// short of resources or the completion queue is full, which the completion thread resolves)
    /// up to `IOLimits.maxSubmitAttempts` times.
    func submit() throws(Errno) {
        var attempts = 0
        while true {
            let status = kvt_uring_submit(ring)
            if status >= 0 {
                // Without SUBMIT_ALL the kernel stops at an entry it cannot start; go on with the rest.
                if kvt_uring_sq_ready(ring) == 0 { return }
                if status > 0 { continue }
            } else if status == -Errno.interrupted.rawValue {
                continue
            } else if status != -Errno.resourceTemporarilyUnavailable.rawValue,
                      status != -Errno.resourceBusy.rawValue {
                throw Errno(rawValue: -status)
            }
            attempts += 1
            guard attempts < IOLimits.maxSubmitAttempts else { throw Errno.resourceTemporarilyUnavailable }
            sched_yield()
        }
    }

    // MARK: Completion side

    /// Blocks until at least one completion is ready; EINTR is retried.
    func waitForCompletion() throws(Errno) {
        while true {
            let status = kvt_uring_wait(ring)
            if status == 0 { return }
            if status == -Errno.interrupted.rawValue { continue }
            throw Errno(rawValue: -status)
        }
    }

    /// Appends every ready completion (up to the completion queue's size) to `output` and releases
    /// their queue slots.
    func reap(into output: inout [kvt_uring_completion]) {
        guard let base = scratch.baseAddress else { return }
        let count = Int(kvt_uring_reap(ring, base, UInt32(clamping: scratch.count)))
        output.append(contentsOf: scratch[..<count])
    }
}
