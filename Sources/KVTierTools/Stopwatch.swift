import KVTierCore
/// Best-of-N timing for benchmarks (monotonic clock: `Clocks`).
public enum Stopwatch {
    /// Runs `body` `repetitions` times and returns the fastest run in seconds.
    public static func best(repetitions: Int, _ body: () throws -> Void) rethrows -> Double {
        var fastest = Double.infinity
        for _ in 0..<max(1, repetitions) {
            let start = Clocks.monotonicNanoseconds()
            try body()
            fastest = min(fastest, Double(Clocks.monotonicNanoseconds() - start) / 1e9)
        }
        return fastest
    }
}
