#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import Dispatch
import KVTierSystem
import Synchronization
import SystemPackage

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
    private let readDescriptor: FileDescriptor?
    /// Byte written to wake the reader so it unblocks newly caught signals.
    private static let refreshByte: UInt8 = 0

    private init() {
        // The handler must never block (its end is non-blocking); the reader does (its end is
        // made blocking again).
        guard let pipe = try? FileDescriptor.nonBlockingPipe(),
              (try? pipe.readEnd.removeStatusFlags(O_NONBLOCK)) != nil
        else {
            // No pipe: nothing is caught and the default dispositions stay (a signal ends the process).
            readDescriptor = nil
            return
        }
        signalPipeWriteDescriptor = pipe.writeEnd.rawValue
        // Without the thread, caught signals would wait in the pipe forever; it starts before
        // any handler is installed, so a failure here leaves the default dispositions. (It
        // reaches `shared` only once this initializer has returned.)
        do {
            try SystemThread(name: "kvt-signals") { SignalRouter.shared.readLoop() }.detach()
            readDescriptor = pipe.readEnd
        } catch {
            readDescriptor = nil
        }
    }

    func register(signals: [Int32], handler: @escaping @Sendable (Int32) -> Void) -> UInt64 {
        let (id, added) = watchers.withLock { state -> (UInt64, Bool) in
            var added = false
            for number in signals where !state.installed.contains(number) && readDescriptor != nil {
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
        guard let readDescriptor else { return }
        var buffer = [UInt8](repeating: 0, count: 64)
        while true {
            let installed = watchers.withLock { $0.installed }
            var set = sigset_t()
            sigemptyset(&set)
            for number in installed { sigaddset(&set, number) }
            pthread_sigmask(SIG_UNBLOCK, &set, nil)
            guard let count = try? buffer.withUnsafeMutableBytes({ raw in try readDescriptor.readSome(into: raw) }),
                  count > 0
            else { return }
            for byte in buffer[0..<count] where byte != Self.refreshByte {
                let number = Int32(byte)
                let handlers = watchers.withLock { state in state.handlers.values.filter { $0.signals.contains(number) }.map(\.run) }
                // Handlers may take a while (a reload reads files): run them off this thread.
                for run in handlers { DispatchQueue.global().async { run(number) } }
            }
        }
    }
}
