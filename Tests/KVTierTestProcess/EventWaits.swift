@preconcurrency import Glibc
import Foundation

/// Waits that end on an event (a datagram, a process exit) rather than on a polling loop with
/// fixed sleeps, each run on a thread of its own: a test that blocked a thread of Swift's
/// cooperative pool (two on a two-core machine) starved every other test's tasks, and the
/// in-process servers of other suites timed out under a loaded full-suite run.
public enum EventWaits {
    /// The overall deadline of a wait that only a stuck process reaches (generous: a loaded
    /// two-core machine starts a debug kvtierd in well under 10 s).
    public static let stuckSeconds: Double = 120

    /// Runs `body` on a new thread and returns its result.
    public static func onThread<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
        await withCheckedContinuation { continuation in
            let thread = Thread { continuation.resume(returning: body()) }
            thread.start()
        }
    }

    private typealias PidfdOpen = @convention(c) (pid_t, UInt32) -> Int32

    /// A pidfd (readable once `pid` exits), or -1 where the kernel or libc lacks pidfd_open.
    public static func pidDescriptor(_ pid: pid_t) -> Int32 {
        guard let symbol = dlsym(nil, "pidfd_open") else { return -1 }
        return unsafeBitCast(symbol, to: PidfdOpen.self)(pid, 0)
    }

    /// Whether child `pid` has exited (or is no child of ours any more), leaving it waitable
    /// (waitid WNOWAIT).
    public static func hasExited(_ pid: pid_t) -> Bool {
        var info = siginfo_t()
        guard waitid(P_PID, id_t(pid), &info, WEXITED | WNOHANG | WNOWAIT) == 0 else { return true }
        return info._sifields._sigchld.si_pid == pid
    }

    /// poll(2) on `descriptors` until one is readable or `deadline`; the readable ones (empty
    /// at the deadline). Without a pidfd the caller passes a short slice and checks itself.
    public static func poll(_ descriptors: [Int32], until deadline: Date) -> [Int32] {
        var fds = descriptors.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
        let millis = Int32(clamping: Int(max(0, deadline.timeIntervalSinceNow) * 1000) + 1)
        let count = fds.withUnsafeMutableBufferPointer { Glibc.poll($0.baseAddress, nfds_t($0.count), millis) }
        guard count > 0 else { return [] }
        return fds.filter { $0.revents != 0 }.map(\.fd)
    }

    /// Blocks until `pid` exits or `deadline` (on its pidfd; a peek every 20 ms without one);
    /// whether it exited. The process is left to be reaped by the caller.
    public static func exit(of pid: pid_t, until deadline: Date) -> Bool {
        let pidfd = pidDescriptor(pid)
        defer { if pidfd >= 0 { close(pidfd) } }
        while Date() < deadline {
            if hasExited(pid) { return true }
            if pidfd >= 0 { _ = poll([pidfd], until: deadline) } else { usleep(20_000) }
        }
        return hasExited(pid)
    }
}
