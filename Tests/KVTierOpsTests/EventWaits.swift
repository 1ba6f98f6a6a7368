@preconcurrency import Glibc
import Foundation

/// Waits that end on an event (a datagram, a process exit) rather than on a polling loop with
/// fixed sleeps, each run on a thread of its own: a test that blocked a thread of Swift's
/// cooperative pool (two on a two-core machine) starved every other test's tasks, and the
/// in-process servers of other suites timed out under a loaded full-suite run.
enum EventWaits {
    /// The overall deadline of a wait that only a stuck process reaches (generous: a loaded
    /// two-core machine starts a debug kvtierd in well under 10 s).
    static let stuckSeconds: Double = 120

    /// Runs `body` on a new thread and returns its result.
    static func onThread<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
        await withCheckedContinuation { continuation in
            let thread = Thread { continuation.resume(returning: body()) }
            thread.start()
        }
    }

    private typealias PidfdOpen = @convention(c) (pid_t, UInt32) -> Int32

    /// A pidfd (readable once `pid` exits), or -1 where the kernel or libc lacks pidfd_open.
    static func pidDescriptor(_ pid: pid_t) -> Int32 {
        guard let symbol = dlsym(nil, "pidfd_open") else { return -1 }
        return unsafeBitCast(symbol, to: PidfdOpen.self)(pid, 0)
    }

    /// Whether child `pid` has exited, leaving it waitable (waitid WNOWAIT).
    static func hasExited(_ pid: pid_t) -> Bool {
        var info = siginfo_t()
        return waitid(P_PID, id_t(pid), &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info._sifields._sigchld.si_pid == pid
    }

    /// poll(2) on `descriptors` until one is readable or `deadline`; the readable ones (empty
    /// at the deadline). Without a pidfd the caller passes a short slice and checks itself.
    static func poll(_ descriptors: [Int32], until deadline: Date) -> [Int32] {
        var fds = descriptors.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
        let millis = Int32(clamping: Int(max(0, deadline.timeIntervalSinceNow) * 1000) + 1)
        let count = fds.withUnsafeMutableBufferPointer { Glibc.poll($0.baseAddress, nfds_t($0.count), millis) }
        guard count > 0 else { return [] }
        return fds.filter { $0.revents != 0 }.map(\.fd)
    }
}

extension ChildProcess {
    /// Waits for the process to exit, event-driven (pidfd), at most `seconds`; its wait status,
    /// or nil when it still runs.
    func awaitExit(seconds: Double = EventWaits.stuckSeconds) async throws -> Int32? {
        if let status = poll() { return status }
        let pid = self.pid
        let deadline = Date().addingTimeInterval(seconds)
        let exited = await EventWaits.onThread { () -> Bool in
            let pidfd = EventWaits.pidDescriptor(pid)
            defer { if pidfd >= 0 { close(pidfd) } }
            while Date() < deadline {
                if pidfd >= 0 {
                    return !EventWaits.poll([pidfd], until: deadline).isEmpty
                }
                // No pidfd (old kernel): a peek every 20 ms, still off the cooperative pool.
                if EventWaits.hasExited(pid) { return true }
                usleep(20_000)
            }
            return false
        }
        return exited ? poll() : nil
    }
}

extension NotifySocket {
    /// Waits until a datagram containing `text` arrives, the child exits, or the deadline
    /// passes; true when it arrived. Throws when the child exits first (with its log).
    func awaitMessage(containing text: String, child: ChildProcess, seconds: Double = EventWaits.stuckSeconds) async throws -> Bool {
        let descriptor = self.descriptor
        let pid = child.pid
        let deadline = Date().addingTimeInterval(seconds)
        let outcome = await EventWaits.onThread { () -> String in
            let pidfd = EventWaits.pidDescriptor(pid)
            defer { if pidfd >= 0 { close(pidfd) } }
            var buffer = [UInt8](repeating: 0, count: 4096)
            while Date() < deadline {
                let slice = pidfd >= 0 ? deadline : min(deadline, Date().addingTimeInterval(0.05))
                let ready = EventWaits.poll(pidfd >= 0 ? [descriptor, pidfd] : [descriptor], until: slice)
                if ready.contains(descriptor) {
                    let n = buffer.withUnsafeMutableBytes { recv(descriptor, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
                    if n > 0, String(decoding: buffer[0..<n], as: UTF8.self).contains(text) { return "arrived" }
                    continue
                }
                if ready.contains(pidfd) { return "exited" }
                if pidfd < 0, EventWaits.hasExited(pid) { return "exited" }
            }
            return "deadline"
        }
        switch outcome {
        case "arrived": return true
        case "exited":
            throw TestFailure("process \(pid) exited (\(child.poll().map(exitCode).map(String.init) ?? "?")) before sending \(text):\n\(child.log)")
        default: return false
        }
    }
}
