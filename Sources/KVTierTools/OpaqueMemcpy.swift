#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// libc's memcpy through a pointer the optimizer cannot see into, for the benchmarks' memcpy
/// baselines: a memcpy into memory freed right after is otherwise a dead store it may delete.
enum OpaqueMemcpy {
    typealias Copy = @convention(c) (UnsafeMutableRawPointer?, UnsafeRawPointer?, Int) -> UnsafeMutableRawPointer?

    /// Nil only if the dynamic linker cannot find memcpy.
    static let copy: Copy? = dlsym(nil, "memcpy").map { unsafeBitCast($0, to: Copy.self) }
}
