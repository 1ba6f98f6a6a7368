@preconcurrency import Glibc
import SystemPackage

/// A named POSIX thread running one closure: blocking loops (an accept loop, a connection, a
/// pread worker, an io_uring completion reaper, a signal pipe reader) live on such threads so
/// they never occupy a thread of Swift's cooperative pool.
///
/// The thread starts joinable with the system's default attributes (the stack size is
/// RLIMIT_STACK, 8 MiB on most systems; none of our threads ever asked for another). Its owner
/// calls exactly one of `join` (waits for it) and `detach` (it cleans up after itself when it
/// returns), once: a thread neither joined nor detached keeps its stack until the process exits.
/// Copyable so that pools can keep their threads in arrays; the once-only rule is the owner's.
public struct SystemThread: Sendable {
    private final class Body {
        let name: String
        let run: @Sendable () -> Void
        init(name: String, _ run: @escaping @Sendable () -> Void) {
            self.name = name
            self.run = run
        }
    }

    /// The kernel keeps 15 bytes of a thread's name (16 with the terminating NUL).
    public static let maxNameBytes = 15

    private let handle: pthread_t

    /// Starts a thread named `name` (cut to `maxNameBytes`; shown by `top -H` and in
    /// /proc/PID/task/TID/comm) running `body`.
    /// - Throws: EAGAIN when the system refuses another thread.
    public init(name: String, _ body: @escaping @Sendable () -> Void) throws(Errno) {
        let context = Unmanaged.passRetained(Body(name: name, body)).toOpaque()
        var handle = pthread_t()
        let status = pthread_create(&handle, nil, { context in
            guard let context else { return nil }
            let body = Unmanaged<Body>.fromOpaque(context).takeRetainedValue()
            SystemThread.nameCurrentThread(body.name)
            body.run()
            return nil
        }, context)
        guard status == 0 else {
            Unmanaged<Body>.fromOpaque(context).release()
            throw Errno(rawValue: status)
        }
        self.handle = handle
    }

    /// Waits for the thread to return. Never from the thread itself.
    public func join() {
        let status = pthread_join(handle, nil)
        precondition(status == 0, "pthread_join failed (errno \(status)): a thread joined twice or from itself")
    }

    /// Lets the thread run on its own; its resources go back to the system when it returns.
    public func detach() {
        _ = pthread_detach(handle)
    }

    private typealias SetName = @convention(c) (pthread_t, UnsafePointer<CChar>) -> Int32

    /// Names the calling thread (cut to `maxNameBytes`); best effort, since a name is only a
    /// diagnostic.
    public static func nameCurrentThread(_ name: String) {
        guard let setName = SystemCall.libcFunction("pthread_setname_np", as: SetName.self) else { return }
        _ = String(decoding: name.utf8.prefix(maxNameBytes), as: UTF8.self).withCString { setName(pthread_self(), $0) }
    }

    /// The calling thread's name, as the kernel keeps it (for tests and diagnostics).
    public static func currentThreadName() -> String {
        typealias GetName = @convention(c) (pthread_t, UnsafeMutablePointer<CChar>, Int) -> Int32
        guard let getName = SystemCall.libcFunction("pthread_getname_np", as: GetName.self) else { return "" }
        var buffer = [CChar](repeating: 0, count: maxNameBytes + 1)
        guard getName(pthread_self(), &buffer, buffer.count) == 0 else { return "" }
        return buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }
}

/// State guarded by a POSIX mutex with a condition variable, for worker threads that sleep until
/// work arrives.
// Invariant for @unchecked Sendable: `state` is read and written only while `mutex` is held.
public final class ConditionLock<State>: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>
    private var state: State

    public init(_ state: State) {
        self.state = state
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        condition = .allocate(capacity: 1)
        condition.initialize(to: pthread_cond_t())
        // Timed waits count on the monotonic clock, so a change of the wall clock cannot stretch them.
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(condition, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(condition)
        condition.deallocate()
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    public func withLock<R>(_ body: (inout State) throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&state)
    }

    /// Sleeps until `ready` holds, then runs `body` under the same lock.
    public func withLock<R>(waitingUntil ready: (State) -> Bool, _ body: (inout State) throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        while !ready(state) {
            pthread_cond_wait(condition, mutex)
        }
        return try body(&state)
    }

    /// Sleeps until `ready` holds or `deadline` passes, then runs `body` under the same lock with
    /// whether `ready` held (false: timed out).
    public func withLock<R>(waitingUntil ready: (State) -> Bool, deadline: Deadline, _ body: (inout State, Bool) throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        var until = timespec(tv_sec: Int(deadline.nanoseconds / 1_000_000_000), tv_nsec: Int(deadline.nanoseconds % 1_000_000_000))
        while !ready(state) {
            if pthread_cond_timedwait(condition, mutex, &until) == ETIMEDOUT { return try body(&state, ready(state)) }
        }
        return try body(&state, true)
    }

    /// Wakes one waiter.
    public func signal() { pthread_cond_signal(condition) }

    /// Wakes every waiter.
    public func broadcast() { pthread_cond_broadcast(condition) }
}
