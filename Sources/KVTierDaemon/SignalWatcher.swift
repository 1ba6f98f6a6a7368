#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import Dispatch
import Synchronization

/// Turns signals into callbacks on a dispatch queue, without ever losing one.
///
/// Why not `DispatchSource.makeSignalSource`: on Linux it sets the signal to SIG_IGN and
/// registers a signalfd later, on dispatch's manager thread; a SIGTERM in between (systemd may
/// stop a service the moment READY=1 arrives) was discarded by the kernel, about 1 start in 12.
/// Here `init` installs a real handler with sigaction before it returns, so a signal that
/// arrives any time after that runs the handler on whichever thread takes it. The handler only
/// writes the signal number to a pipe (async-signal-safe); a dispatch read source drains the
/// pipe and calls the watchers, and a byte written before that source is registered waits in
/// the pipe.
final class SignalWatcher: Sendable {
    private let id: UInt64

    /// Installs the handler for `signals` (idempotent across watchers) and registers `handler`.
    /// A watcher that is cancelled stops receiving; the signals stay caught (and are dropped
    /// while no watcher wants them) so a late SIGTERM never kills a stopping daemon uncleanly.
    init(signals: [Int32], handler: @escaping @Sendable (Int32) -> Void) {
        id = SignalRouter.shared.register(signals: signals, handler: handler)
    }

    func cancel() { SignalRouter.shared.unregister(id) }
}

/// The write end of the signal pipe, read by the signal handler. Set once, before any
/// handler is installed, and never changed: the handler reads a plain integer.
nonisolated(unsafe) private var signalPipeWriteDescriptor: Int32 = -1

/// The process-wide half of `SignalWatcher`: one pipe, one thread that reads it, the handlers.
///
/// The reader thread keeps every caught signal unblocked in its own mask, so there is always a
/// thread the kernel can deliver to (dispatch's worker threads block nearly all signals); until
/// it has unblocked a newly caught signal, that signal stays pending, never dropped.
private final class SignalRouter: Sendable {
    static let shared = SignalRouter()

    private struct Watchers {
        var nextID: UInt64 = 1
        var handlers: [UInt64: (signals: Set<Int32>, run: @Sendable (Int32) -> Void)] = [:]
        var installed: Set<Int32> = []
    }
    private let watchers = Mutex(Watchers())
    private let readDescriptor: Int32
    /// Byte written to wake the reader so it unblocks newly caught signals.
    private static let refreshByte: UInt8 = 0

    private init() {
        var ends: [Int32] = [-1, -1]
        guard pipe(&ends) == 0 else {
            // No pipe: nothing is caught and the default dispositions stay (a signal ends the process).
            readDescriptor = -1
            return
        }
        for descriptor in ends { _ = fcntl(descriptor, F_SETFD, FD_CLOEXEC) }
        // The handler must never block; the reader does.
        _ = fcntl(ends[1], F_SETFL, fcntl(ends[1], F_GETFL) | O_NONBLOCK)
        readDescriptor = ends[0]
        signalPipeWriteDescriptor = ends[1]
        var thread = pthread_t()
        if pthread_create(&thread, nil, { _ in SignalRouter.shared.readLoop(); return nil }, nil) == 0 {
            pthread_detach(thread)
        }
    }

    func register(signals: [Int32], handler: @escaping @Sendable (Int32) -> Void) -> UInt64 {
        let (id, added) = watchers.withLock { state -> (UInt64, Bool) in
            var added = false
            for number in signals where !state.installed.contains(number) && readDescriptor >= 0 {
                Self.installHandler(number)
                state.installed.insert(number)
                added = true
            }
            let id = state.nextID
            state.nextID += 1
            state.handlers[id] = (Set(signals), handler)
            return (id, added)
        }
        if added { Self.wakeReader(Self.refreshByte) }
        return id
    }

    func unregister(_ id: UInt64) {
        _ = watchers.withLock { $0.handlers.removeValue(forKey: id) }
    }

    private static func installHandler(_ number: Int32) {
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { number in
            let saved = errno
            SignalRouter.wakeReader(UInt8(truncatingIfNeeded: number))
            errno = saved
        }
        action.sa_flags = SA_RESTART
        sigemptyset(&action.sa_mask)
        _ = sigaction(number, &action, nil)
    }

    /// Async-signal-safe: one write(2) of one byte.
    private static func wakeReader(_ byte: UInt8) {
        var value = byte
        _ = write(signalPipeWriteDescriptor, &value, 1)
    }

    private func readLoop() {
        var buffer = [UInt8](repeating: 0, count: 64)
        while true {
            let installed = watchers.withLock { $0.installed }
            var set = sigset_t()
            sigemptyset(&set)
            for number in installed { sigaddset(&set, number) }
            pthread_sigmask(SIG_UNBLOCK, &set, nil)
            let count = buffer.withUnsafeMutableBytes { read(readDescriptor, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { return }
            for byte in buffer[0..<count] where byte != Self.refreshByte {
                let number = Int32(byte)
                let handlers = watchers.withLock { state in state.handlers.values.filter { $0.signals.contains(number) }.map(\.run) }
                // Handlers may take a while (a reload reads files): run them off this thread.
                for run in handlers { DispatchQueue.global().async { run(number) } }
            }
        }
    }
}
