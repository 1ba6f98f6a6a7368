#if canImport(Glibc)
@preconcurrency import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The two clocks KVTier reads: monotonic time for durations, recency and heat; wall-clock
/// time for what is written to disk (record creation times), which must mean something after
/// a reboot.
public enum Clocks {
    /// Monotonic nanoseconds (CLOCK_MONOTONIC): durations and benchmarks.
    public static func monotonicNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// Monotonic microseconds: recency and heat of pages in memory.
    public static func monotonicMicros() -> UInt64 { monotonicNanoseconds() / 1000 }

    /// Microseconds since the Unix epoch (CLOCK_REALTIME): timestamps stored on disk.
    public static func wallMicros() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return UInt64(ts.tv_sec) * 1_000_000 + UInt64(ts.tv_nsec) / 1000
    }
}
