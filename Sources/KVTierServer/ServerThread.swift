@preconcurrency import Glibc
import Dispatch
import SystemPackage

/// Detached POSIX threads for the accept loop and for each connection: their blocking waits
/// never occupy a thread of Swift's cooperative pool.
enum ServerThread {
    private final class Body {
        let name: String
        let run: @Sendable () -> Void
        init(name: String, _ run: @escaping @Sendable () -> Void) {
            self.name = name
            self.run = run
        }
    }

    /// Starts a detached thread named `name` running `body`; EAGAIN when the system refuses.
    static func start(name: String, _ body: @escaping @Sendable () -> Void) throws(Errno) {
        var attributes = pthread_attr_t()
        pthread_attr_init(&attributes)
        defer { pthread_attr_destroy(&attributes) }
        pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED))
        let context = Unmanaged.passRetained(Body(name: name, body)).toOpaque()
        var handle = pthread_t()
        let status = pthread_create(&handle, &attributes, { context in
            guard let context else { return nil }
            let body = Unmanaged<Body>.fromOpaque(context).takeRetainedValue()
            SocketSystem.nameCurrentThread(body.name)
            body.run()
            return nil
        }, context)
        guard status == 0 else {
            Unmanaged<Body>.fromOpaque(context).release()
            throw Errno(rawValue: status)
        }
    }

    /// Runs `operation` as a task and blocks the calling thread until it returns. Only for the
    /// server's own threads (blocking a cooperative-pool thread this way could deadlock the pool).
    /// `started` receives the task, so that a forced shutdown can cancel it.
    static func awaitTask<T: Sendable>(
        _ operation: @escaping @Sendable () async -> T, started: (Task<Void, Never>) -> Void = { _ in }
    ) -> T {
        let rendezvous = Rendezvous<T>()
        let task = Task {
            rendezvous.deliver(await operation())
        }
        started(task)
        return rendezvous.wait()
    }
}

/// One value handed from a task to a waiting thread.
// Invariant for @unchecked Sendable: `value` is written once before `semaphore` is signalled and
// read only after the wait on it returns, so the semaphore orders the two accesses.
private final class Rendezvous<T: Sendable>: @unchecked Sendable {
    private let semaphore = DispatchSemaphore(value: 0)
    private var value: T?

    func deliver(_ value: T) {
        self.value = value
        semaphore.signal()
    }

    func wait() -> T {
        semaphore.wait()
        return value!
    }
}
