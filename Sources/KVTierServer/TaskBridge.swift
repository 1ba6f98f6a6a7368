import Dispatch

/// The bridge from the server's own threads (KVTierSystem's `SystemThread`s: the accept loop
/// and one per connection) into Swift concurrency.
enum TaskBridge {
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
