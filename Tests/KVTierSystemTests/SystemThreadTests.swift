@preconcurrency import Glibc
import KVTierSystem
import Synchronization
import SystemPackage
import Testing

@Suite struct SystemThreadTests {
    @Test func aThreadRunsNamedAndJoins() throws {
        let seen = Mutex<(name: String, ran: Bool)>(("", false))
        let thread = try SystemThread(name: "kvt-test-thread-with-a-long-name") {
            seen.withLock { $0 = (SystemThread.currentThreadName(), true) }
        }
        thread.join()
        let (name, ran) = seen.withLock { $0 }
        #expect(ran, "join returns after the body ran")
        #expect(name == "kvt-test-thread", "the kernel keeps the first 15 bytes")
    }

    @Test func aDetachedThreadRunsToTheEnd() throws {
        let done = ConditionLock(false)
        try SystemThread(name: "kvt-detached") {
            done.withLock { $0 = true }
            done.broadcast()
        }.detach()
        done.withLock(waitingUntil: { $0 }) { _ in }
    }

    @Test func manyThreadsJoinInAnyOrder() throws {
        let count = Mutex(0)
        let threads = try (0..<8).map { index in
            try SystemThread(name: "kvt-pool\(index)") { count.withLock { $0 += 1 } }
        }
        for thread in threads.reversed() { thread.join() }
        #expect(count.withLock { $0 } == 8)
    }
}
