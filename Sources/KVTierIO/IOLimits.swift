/// Every limit and default of the I/O layer in one place.
public enum IOLimits {
    /// Alignment of offsets, lengths and memory for O_DIRECT reads. 4096 is a multiple of every
    /// logical block size in use, so checking against it is always safe.
    public static let directIOAlignment = 4096
    /// Default io_uring submission queue depth.
    public static let defaultQueueDepth = 64
    /// Largest io_uring queue depth accepted; larger requests are clamped.
    public static let maxQueueDepth = 4096
    /// Default number of threads of the pread fallback.
    public static let defaultPreadThreads = 4
    /// Largest number of pread threads accepted; larger requests are clamped.
    public static let maxPreadThreads = 64
    /// Largest number of bytes asked of the kernel in one read call; a longer request is read in
    /// several calls. Keeps lengths within the 32-bit fields of io_uring and `ssize_t` results.
    public static let maxBytesPerCall = 1 << 30
    /// How often a read that failed with EAGAIN is tried again before the error is reported.
    /// EINTR is always retried.
    public static let maxTransientRetries = 8
    /// How often `io_uring_submit` is tried while the kernel answers EAGAIN or EBUSY before the
    /// ring is declared broken.
    public static let maxSubmitAttempts = 100_000
}
