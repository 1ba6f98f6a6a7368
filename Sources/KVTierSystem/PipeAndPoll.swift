@preconcurrency import Glibc
import SystemPackage

extension FileDescriptor {
    private typealias Pipe2 = @convention(c) (UnsafeMutablePointer<Int32>, Int32) -> Int32

    /// pipe2(O_CLOEXEC | O_NONBLOCK): a wake-up channel between threads; writes never block (a
    /// full pipe has woken its reader already) and reads drain without waiting.
    public static func nonBlockingPipe() throws(Errno) -> (readEnd: FileDescriptor, writeEnd: FileDescriptor) {
        guard let pipe2 = SystemCall.libcFunction("pipe2", as: Pipe2.self) else { throw .noFunction }
        var ends: [Int32] = [-1, -1]
        _ = try ends.withUnsafeMutableBufferPointer { (ends) throws(Errno) -> Int32 in
            try SystemCall.retryingInterrupts { pipe2(ends.baseAddress!, O_CLOEXEC | O_NONBLOCK) }
        }
        return (FileDescriptor(rawValue: ends[0]), FileDescriptor(rawValue: ends[1]))
    }

    /// One read(2) at the current position; 0 at end of file. A non-blocking descriptor with
    /// nothing to read throws EAGAIN.
    public func readSome(into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
        let descriptor = rawValue
        return try SystemCall.retryingInterrupts { Glibc.read(descriptor, buffer.baseAddress, buffer.count) }
    }

    /// One write(2) at the current position; returns the bytes written.
    public func writeSome(_ bytes: UnsafeRawBufferPointer) throws(Errno) -> Int {
        let descriptor = rawValue
        return try SystemCall.retryingInterrupts { Glibc.write(descriptor, bytes.baseAddress, bytes.count) }
    }

    /// Writes one byte (a wake-up through a pipe).
    public func writeByte(_ byte: UInt8) throws(Errno) {
        let descriptor = rawValue
        var value = byte
        _ = try SystemCall.retryingInterrupts { Glibc.write(descriptor, &value, 1) }
    }

    /// Reads and drops whatever a non-blocking descriptor holds now (wake-up bytes of a pipe).
    public func drain() {
        var scratch = [UInt8](repeating: 0, count: 64)
        while (try? scratch.withUnsafeMutableBytes { raw in try readSome(into: raw) }) ?? 0 > 0 {}
    }
}

extension pollfd {
    /// A poll entry for `descriptor` waiting for `events` (POLLIN, POLLOUT).
    public init(_ descriptor: FileDescriptor, events: Int16) {
        self.init(fd: descriptor.rawValue, events: events, revents: 0)
    }

    /// Whether poll reported any of `events` (POLLHUP and POLLERR count as readable: the next
    /// read reports them).
    public func reported(_ events: Int16) -> Bool { revents & events != 0 }
}

public enum Poll {
    /// poll(2) on `descriptors` for up to `timeoutMillis` (-1: forever). Returns how many are
    /// ready: 0 after the timeout and also when a signal interrupted the wait (EINTR), so the
    /// caller recomputes its deadline and polls again.
    public static func wait(_ descriptors: inout [pollfd], timeoutMillis: Int32) throws(Errno) -> Int {
        let count = nfds_t(descriptors.count)
        let result = descriptors.withUnsafeMutableBufferPointer { Glibc.poll($0.baseAddress, count, timeoutMillis) }
        if result >= 0 { return Int(result) }
        if errno == EINTR { return 0 }
        throw Errno(rawValue: errno)
    }

    /// Waits until `descriptor` is readable (or at end of stream, or in error: the next read says
    /// which): true when ready, false after `timeoutMillis` or on EINTR.
    public static func waitReadable(_ descriptor: FileDescriptor, timeoutMillis: Int32) throws(Errno) -> Bool {
        var entries = [pollfd(descriptor, events: Int16(POLLIN))]
        return try wait(&entries, timeoutMillis: timeoutMillis) > 0
    }

    /// Milliseconds for poll from a duration, rounded up so a wait never ends early, and
    /// clamped to Int32.
    public static func millisecondsRoundedUp(_ duration: Duration) -> Int32 {
        guard duration > .zero else { return 0 }
        let (seconds, attoseconds) = duration.components
        return Int32(clamping: seconds * 1000 + (attoseconds + 999_999_999_999_999) / 1_000_000_000_000_000)
    }
}
