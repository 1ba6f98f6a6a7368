@preconcurrency import Glibc
import SystemPackage

/// How every wrapper in KVTierSystem calls the kernel: a failure becomes `Errno`, and an
/// interrupted call (EINTR) is made again — here and nowhere else. The two calls for which
/// EINTR means something else say so where they are wrapped: `close` (Linux releases the
/// descriptor even then, so it is never retried) and `Poll.wait` (reported as "nothing ready",
/// so its caller recomputes its deadline); `connect` waits for an interrupted connect to finish.
public enum SystemCall {
    /// Calls `call` until it returns anything but -1 with errno EINTR; -1 with any other errno
    /// is thrown as that `Errno`. For calls that report failure as -1 and set errno.
    public static func retryingInterrupts<Result: FixedWidthInteger>(_ call: () -> Result) throws(Errno) -> Result {
        while true {
            let result = call()
            if result != -1 { return result }
            let code = errno
            if code != EINTR { throw Errno(rawValue: code) }
        }
    }

    /// For calls that return their error number instead of setting errno (`pthread_*`,
    /// `posix_fadvise`, `posix_memalign`): 0 passes, anything else is thrown.
    public static func checkingStatus(_ status: Int32) throws(Errno) {
        if status != 0 { throw Errno(rawValue: status) }
    }

    /// A libc function hidden behind _GNU_SOURCE, which Swift's Glibc module does not define
    /// (accept4, pipe2, memfd_create, pthread_setname_np), looked up at run time. nil where
    /// this libc lacks it.
    static func libcFunction<Function>(_ name: String, as type: Function.Type) -> Function? {
        guard let symbol = dlsym(nil, name) else { return nil }
        return unsafeBitCast(symbol, to: type)
    }
}

extension FileDescriptor {
    /// close(2), never retried: Linux releases the descriptor even when close reports EINTR, and
    /// a retry could close a descriptor another thread has just been given. Errors are dropped;
    /// use `closeReportingErrors` where a failed close means lost data.
    public func closeIgnoringErrors() {
        _ = Glibc.close(rawValue)
    }

    /// close(2) that reports a failure other than EINTR (after which the descriptor is closed).
    public func closeReportingErrors() throws(Errno) {
        if Glibc.close(rawValue) != 0 && errno != EINTR { throw Errno(rawValue: errno) }
    }
}
