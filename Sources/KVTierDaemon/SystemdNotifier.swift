#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import Dispatch
import KVTierCore
import KVTierSystem
import Logging
import SystemPackage
import Synchronization

/// The sd_notify protocol, spoken directly (no libsystemd): one datagram per message to the
/// AF_UNIX socket named by `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace).
/// Without `NOTIFY_SOCKET` every call does nothing, so the daemon runs the same by hand.
///
/// Messages kvtierd sends: `STATUS=…` while starting, `READY=1` once recovery is done and the
/// socket accepts, `WATCHDOG=1` every half `WATCHDOG_USEC`, `STOPPING=1` on shutdown.
public final class SystemdNotifier: Sendable {
    /// The socket address as given in `NOTIFY_SOCKET`; nil when not run under systemd.
    public let address: String?
    /// Interval between `WATCHDOG=1` pings (half of `WATCHDOG_USEC`); nil when the watchdog is
    /// off or meant for another process (`WATCHDOG_PID`).
    public let watchdogIntervalMicros: UInt64?
    private let logger: Logger
    private let watchdog = Mutex(TimerSlot())

    // Invariant: the timer is touched only under the `watchdog` mutex (DispatchSource itself is
    // thread-safe; the type just is not marked Sendable).
    private struct TimerSlot: @unchecked Sendable {
        var timer: DispatchSourceTimer?
    }
    private let failureLogged = Atomic<Bool>(false)

    public init(environment: [String: String], processID: pid_t = getpid(), logger: Logger) {
        self.logger = logger
        let address = environment["NOTIFY_SOCKET"].flatMap { $0.isEmpty ? nil : $0 }
        self.address = address
        self.watchdogIntervalMicros = Self.watchdogInterval(environment: environment, processID: processID)
    }

    /// Half of `WATCHDOG_USEC` when it is set, positive, and `WATCHDOG_PID` is unset or names
    /// `processID` (sd_watchdog_enabled's rules).
    static func watchdogInterval(environment: [String: String], processID: pid_t) -> UInt64? {
        guard let text = environment["WATCHDOG_USEC"], let micros = UInt64(text), micros > 0 else { return nil }
        if let owner = environment["WATCHDOG_PID"], !owner.isEmpty {
            guard let pid = pid_t(owner), pid == processID else { return nil }
        }
        return max(micros / 2, 1)
    }

    /// Sends `READY=1` with a status line.
    public func ready(status: String) { send("READY=1\nSTATUS=\(status)") }
    /// Sends a `STATUS=` line (shown by `systemctl status`).
    public func status(_ text: String) { send("STATUS=\(text)") }
    /// Sends `STOPPING=1` with a status line.
    public func stopping(status: String) { send("STOPPING=1\nSTATUS=\(status)") }
    /// Sends `RELOADING=1` before a SIGHUP reload and `READY=1` after it.
    public func reloading() { send("RELOADING=1\nMONOTONIC_USEC=\(Clocks.monotonicMicros())\nSTATUS=reloading configuration") }

    /// Starts pinging `WATCHDOG=1` every `watchdogIntervalMicros` on a dispatch timer while
    /// `isHealthy` returns true; a daemon that stops answering stops pinging and systemd restarts it.
    public func startWatchdog(isHealthy: @escaping @Sendable () -> Bool = { true }) {
        guard address != nil, let interval = watchdogIntervalMicros else { return }
        // A queue of its own: a timer on a global queue waits for a free worker, and workers
        // can all be busy (blocked) when the store is slow.
        let timer = DispatchSource.makeTimerSource(queue: DispatchQueue(label: "kvtierd.watchdog"))
        timer.schedule(deadline: .now(), repeating: .microseconds(Int(min(interval, UInt64(Int.max)))), leeway: .milliseconds(10))
        timer.setEventHandler { [weak self] in
            guard let self, isHealthy() else { return }
            self.send("WATCHDOG=1")
        }
        let slot = TimerSlot(timer: timer)
        watchdog.withLock { current in
            current.timer?.cancel()
            current = slot
        }
        timer.resume()
        logger.info("systemd watchdog pings", metadata: ["intervalMicros": "\(interval)"])
    }

    public func stopWatchdog() {
        watchdog.withLock { current in
            current.timer?.cancel()
            current.timer = nil
        }
    }

    deinit { stopWatchdog() }

    /// One datagram to `NOTIFY_SOCKET`. Failures are logged once and otherwise ignored: a
    /// missing notification makes systemd time the service out, which says more than a crash.
    public func send(_ message: String) {
        guard let address else { return }
        do throws(NotifyError) {
            try Self.send(message, to: address)
        } catch {
            if !failureLogged.exchange(true, ordering: .relaxed) {
                logger.warning("sd_notify failed", metadata: ["socket": "\(address)", "error": "\(error)"])
            }
        }
    }

    struct NotifyError: Error, CustomStringConvertible {
        var operation: String
        var errno: Int32
        var description: String { "\(operation): \(String(cString: strerror(errno))) (errno \(errno))" }
    }

    static func send(_ message: String, to address: String) throws(NotifyError) {
        guard address.first == "/" || address.first == "@" else {
            throw NotifyError(operation: "NOTIFY_SOCKET '\(address)' is not an absolute path or @abstract name", errno: EINVAL)
        }
        let target: UnixSocketAddress
        do {
            target = address.first == "@" ? try .abstract(String(address.dropFirst())) : try UnixSocketAddress(address)
        } catch {
            throw NotifyError(operation: "NOTIFY_SOCKET '\(address)' does not fit a Unix socket address", errno: error.rawValue)
        }
        let socket: FileDescriptor
        do { socket = try FileDescriptor.unixSocket(.datagram) } catch { throw NotifyError(operation: "socket", errno: error.rawValue) }
        defer { socket.closeIgnoringErrors() }
        // Never blocks (sendDatagram is MSG_DONTWAIT): a Unix datagram socket whose reader lags
        // (its queue holds max_dgram_qlen, 10 by default) would otherwise stall the caller, a
        // watchdog tick or a request thread, until the manager reads again. A notification that
        // does not fit is dropped and logged.
        let sent = Array(message.utf8).withUnsafeBytes { raw in Result { () throws(Errno) in try socket.sendDatagram(raw, to: target) } }
        if case .failure(let error) = sent { throw NotifyError(operation: "sendto \(address)", errno: error.rawValue) }
    }
}

/// Sockets passed by systemd socket activation (`LISTEN_PID`, `LISTEN_FDS`, first at fd 3).
public enum SystemdListenDescriptors {
    /// First descriptor systemd passes (SD_LISTEN_FDS_START).
    public static let firstDescriptor: Int32 = 3

    /// The descriptors passed to `processID`: empty unless `LISTEN_PID` names it and
    /// `LISTEN_FDS` is a positive count.
    public static func passed(environment: [String: String], processID: pid_t = getpid()) -> [Int32] {
        guard let pidText = environment["LISTEN_PID"], let pid = pid_t(pidText), pid == processID,
              let countText = environment["LISTEN_FDS"], let count = Int32(countText), count > 0
        else { return [] }
        return (0..<count).map { firstDescriptor + $0 }
    }

    /// Removes `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` so children do not take the
    /// sockets for theirs (sd_listen_fds(unset_environment: 1)).
    public static func unsetEnvironment() {
        unsetenv("LISTEN_PID")
        unsetenv("LISTEN_FDS")
        unsetenv("LISTEN_FDNAMES")
    }
}
