@preconcurrency import Glibc
import KVTierCore
import KVTierProtocol
import KVTierSystem
import Logging
import Synchronization
import SystemPackage

/// The transport of kvtierd: accepts connections on a `UnixListener`, serves each on its own
/// thread, answers `HELLO` and `PING`, and passes every other request to a `RequestHandler`.
///
/// A Service: `run()` serves until `shutdown()` (or cancellation of the task running it), then
/// stops accepting, lets requests in progress finish for up to `shutdownGracePeriod`, shuts the
/// rest down, closes the listener (removing its socket file) and returns.
public final class KVServer: Sendable {
    /// A tenant's shared memory as the `HELLO` reply offers it: two memfds the daemon keeps open
    /// for as long as the tenant exists (the server sends them, never closes them) and their
    /// lengths: the page arena (clients map it read-only) and the staging arena (read-write).
    public struct TenantArenas: Sendable, Equatable {
        public var pages: (descriptor: Int32, bytes: Int)
        public var staging: (descriptor: Int32, bytes: Int)

        public init(pages: (descriptor: Int32, bytes: Int), staging: (descriptor: Int32, bytes: Int)) {
            self.pages = pages
            self.staging = staging
        }

        public static func == (a: Self, b: Self) -> Bool { a.pages == b.pages && a.staging == b.staging }

        var isUsable: Bool { pages.descriptor >= 0 && pages.bytes > 0 && staging.descriptor >= 0 && staging.bytes > 0 }
    }

    /// Returns the tenant's arenas, shared with its clients in the `HELLO` reply. nil: no
    /// shared memory for this tenant. A throw is logged and the connection goes on without
    /// shared memory (inline data).
    public typealias ArenaProvider = @Sendable (TenantID) throws -> TenantArenas?

    /// How long `run()` still waits for connections after forcing them closed.
    static let forcedCloseWait: Duration = .seconds(1)

    public let counters: ServerCounters
    let listener: UnixListener
    let handler: any RequestHandler
    let configuration: ServerConfiguration
    let tenantFor: @Sendable (PeerCredentials) -> TenantID?
    let arenaProvider: ArenaProvider?
    let logger: Logger
    /// Bytes of frames being assembled, bounded in total and per uid.
    public let frameBudget: FrameBudget
    /// Liveness probes sent to the accept loop, and the count it had seen when it last
    /// answered (`livenessProbe`).
    let probesSent = Atomic<UInt64>(0)
    let probesAnswered = Atomic<UInt64>(0)
    let state = Mutex(State())

    struct State {
        enum Phase { case idle, running, stopped }
        var phase = Phase.idle
        var stopRequested = false
        var stopWaiter: CheckedContinuation<Void, Never>?
        /// Readable once shutdown begins (one byte, never drained): wakes every polling thread.
        var wake: (readEnd: FileDescriptor, writeEnd: FileDescriptor)?
        /// A byte per liveness probe, drained by the accept loop.
        var probe: (readEnd: FileDescriptor, writeEnd: FileDescriptor)?
        var acceptLoopRunning = false
        var acceptFailure: ServerError?
        var nextConnectionID: UInt64 = 1
        var connections: [UInt64: Entry] = [:]
        /// Open connections by peer uid, for `maxConnectionsPerUID`.
        var connectionsByUID: [UInt32: Int] = [:]
    }

    struct Entry {
        /// Closed only under the state lock, when the entry is removed, so a forced shutdown
        /// never touches a reused descriptor number.
        var descriptor: FileDescriptor
        var uid: UInt32
        /// The handler task in progress, cancelled by a forced shutdown.
        var task: Task<Void, Never>?
    }

    /// - Parameters:
    ///   - tenantFor: the tenant of a peer, from its credentials at connect time (default: its
    ///     uid); nil refuses the peer (`permissionDenied` to its `HELLO`).
    ///   - arenaProvider: the tenant arenas offered to clients that can map memory (default: none).
    public init(listener: UnixListener, handler: any RequestHandler, configuration: ServerConfiguration = ServerConfiguration(),
                counters: ServerCounters = ServerCounters(), tenantFor: @escaping @Sendable (PeerCredentials) -> TenantID? = { TenantID($0.uid) },
                arenaProvider: ArenaProvider? = nil, logger: Logger) {
        self.listener = listener
        self.handler = handler
        self.configuration = configuration
        self.counters = counters
        self.tenantFor = tenantFor
        self.arenaProvider = arenaProvider
        self.logger = logger
        frameBudget = FrameBudget(totalBytes: configuration.maxBufferedFrameBytes, perUIDBytes: configuration.maxBufferedFrameBytesPerUID)
    }

    deinit {
        // Every thread that polls the wake pipe holds a reference to self, so none is left.
        let (wake, probe) = state.withLock { ($0.wake, $0.probe) }
        for pipe in [wake, probe].compactMap({ $0 }) {
            pipe.readEnd.closeIgnoringErrors()
            pipe.writeEnd.closeIgnoringErrors()
        }
    }

    /// Connections being served now.
    public var openConnections: Int { state.withLock { $0.connections.count } }

    /// Serves until `shutdown()`; throws when the listener fails (the server shuts down first).
    public func run() async throws {
        let wake: (readEnd: FileDescriptor, writeEnd: FileDescriptor)
        let probe: (readEnd: FileDescriptor, writeEnd: FileDescriptor)
        do { wake = try FileDescriptor.nonBlockingPipe() } catch { throw ServerError.system(operation: "pipe2", error) }
        do { probe = try FileDescriptor.nonBlockingPipe() } catch {
            wake.readEnd.closeIgnoringErrors()
            wake.writeEnd.closeIgnoringErrors()
            throw ServerError.system(operation: "pipe2", error)
        }
        let stopAlready = state.withLock { state in
            precondition(state.phase == .idle, "KVServer.run() is called once")
            state.phase = .running
            state.wake = wake
            state.probe = probe
            state.acceptLoopRunning = true
            return state.stopRequested
        }
        if stopAlready { try? wake.writeEnd.writeByte(1) }
        do {
            try SystemThread(name: "kvt-accept") { self.acceptLoop(wakeDescriptor: wake.readEnd, probeDescriptor: probe.readEnd) }.detach()
        } catch {
            state.withLock { $0.acceptLoopRunning = false; $0.phase = .stopped }
            listener.close()
            throw ServerError.system(operation: "pthread_create", error)
        }
        logger.info("server listening", metadata: [
            "path": "\(listener.path ?? "(adopted descriptor \(listener.descriptor))")",
            "maxConnections": "\(configuration.maxConnections)",
        ])
        await withTaskCancellationHandler {
            await waitForStopRequest()
        } onCancel: {
            self.shutdown()
        }
        await drain()
        listener.close()
        let failure = state.withLock { state in
            state.phase = .stopped
            return state.acceptFailure
        }
        logger.info("server stopped")
        if let failure { throw failure }
    }

    /// Begins a graceful shutdown: stop accepting, close idle connections, let requests in
    /// progress finish. Returns at once; `run()` returns when it is done. Idempotent.
    public func shutdown() {
        let (waiter, wakeWrite) = state.withLock { state -> (CheckedContinuation<Void, Never>?, FileDescriptor?) in
            guard !state.stopRequested else { return (nil, nil) }
            state.stopRequested = true
            defer { state.stopWaiter = nil }
            return (state.stopWaiter, state.wake?.writeEnd)
        }
        if let wakeWrite { try? wakeWrite.writeByte(1) }
        waiter?.resume()
    }

    var isStopping: Bool { state.withLock { $0.stopRequested } }

    private func waitForStopRequest() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let resumeNow = state.withLock { state in
                if state.stopRequested { return true }
                state.stopWaiter = continuation
                return false
            }
            if resumeNow { continuation.resume() }
        }
    }

    /// Waits for the accept loop and the connections to end, forcing connections after the
    /// grace period.
    private func drain() async {
        let open = openConnections
        if open > 0 { logger.info("server draining connections", metadata: ["connections": "\(open)"]) }
        let isIdle = { @Sendable in self.state.withLock { $0.connections.isEmpty && !$0.acceptLoopRunning } }
        if await Self.poll(until: ContinuousClock.now + configuration.shutdownGracePeriod, isIdle) { return }
        let (descriptors, tasks) = state.withLock { state in
            for entry in state.connections.values { entry.descriptor.shutdown() }
            return (state.connections.count, state.connections.values.compactMap(\.task))
        }
        logger.warning("shutdown grace period over; forcing connections closed", metadata: [
            "connections": "\(descriptors)", "requestsInProgress": "\(tasks.count)",
        ])
        for task in tasks { task.cancel() }
        if await Self.poll(until: ContinuousClock.now + Self.forcedCloseWait, isIdle) { return }
        logger.error("connections outlived shutdown; their handlers ignore cancellation", metadata: ["connections": "\(openConnections)"])
        _ = await Self.poll(until: nil) { self.state.withLock { !$0.acceptLoopRunning } }
    }

    /// Checks `condition` every few milliseconds until it holds (true) or `deadline` passes
    /// (false). Only used while stopping; sleeps even if the calling task is cancelled.
    private static func poll(until deadline: ContinuousClock.Instant?, _ condition: @Sendable () -> Bool) async -> Bool {
        while !condition() {
            if let deadline, ContinuousClock.now >= deadline { return false }
            await Task.detached { try? await Task.sleep(for: .milliseconds(5)) }.value
        }
        return true
    }

    // MARK: Accepting

    /// For the systemd watchdog: true when the accept loop answered every earlier probe (it
    /// is polling, not stuck), false otherwise or once it has stopped; then sends a new probe.
    /// The watchdog is driven by this rather than by the store: a ping must not wait on the
    /// store's lock behind requests (a long request would get a healthy daemon killed), and a
    /// loop that accepts no connections is what a dead daemon looks like to clients.
    public func livenessProbe() -> Bool {
        let (running, probe) = state.withLock { ($0.acceptLoopRunning, $0.probe) }
        guard running, let probe else { return false }
        let healthy = probesAnswered.load(ordering: .acquiring) >= probesSent.load(ordering: .acquiring)
        probesSent.wrappingAdd(1, ordering: .releasing)
        try? probe.writeEnd.writeByte(1)
        return healthy
    }

    private func acceptLoop(wakeDescriptor: FileDescriptor, probeDescriptor: FileDescriptor) {
        defer { state.withLock { $0.acceptLoopRunning = false } }
        let listening = FileDescriptor(rawValue: listener.descriptor)
        while true {
            var fds = [
                pollfd(listening, events: Int16(POLLIN)),
                pollfd(wakeDescriptor, events: Int16(POLLIN)),
                pollfd(probeDescriptor, events: Int16(POLLIN)),
            ]
            do { _ = try Poll.wait(&fds, timeoutMillis: -1) } catch {
                return failAccepting(.system(operation: "poll on listener", error))
            }
            if fds[1].revents != 0 { return }
            if fds[2].revents != 0 {
                // Answer first, so `probesAnswered` covers every probe whose byte was drained.
                let sent = probesSent.load(ordering: .acquiring)
                probeDescriptor.drain()
                probesAnswered.store(sent, ordering: .releasing)
            }
            if fds[0].revents & Int16(POLLERR | POLLNVAL) != 0 {
                return failAccepting(.system(operation: "poll on listener", .badFileDescriptor))
            }
            guard fds[0].revents & Int16(POLLIN) != 0 else { continue }
            let client: FileDescriptor
            do {
                client = try listening.acceptConnection()
            } catch {
                switch error.rawValue {
                case EAGAIN, ECONNABORTED, EPROTO, EPERM:
                    continue
                case EMFILE, ENFILE, ENOBUFS, ENOMEM:
                    logger.warning("accept failed for lack of resources; retrying shortly", metadata: ["errno": "\(error)"])
                    _ = try? Poll.waitReadable(wakeDescriptor, timeoutMillis: 100)
                    continue
                default:
                    return failAccepting(.system(operation: "accept", error))
                }
            }
            admit(client, wakeDescriptor: wakeDescriptor)
        }
    }

    private func failAccepting(_ error: ServerError) {
        logger.error("accept loop failed; shutting down", metadata: ["error": "\(error)"])
        state.withLock { $0.acceptFailure = error }
        shutdown()
    }

    /// Registers `client` and starts its thread, or refuses it when the server is full.
    private func admit(_ client: FileDescriptor, wakeDescriptor: FileDescriptor) {
        let peer: PeerCredentials
        do { peer = try PeerCredentials(ofSocket: client.rawValue) } catch {
            logger.warning("could not read peer credentials; closing connection", metadata: ["errno": "\(error)"])
            client.closeIgnoringErrors()
            return
        }
        let admission = state.withLock { state -> Result<UInt64, Refusal> in
            if state.stopRequested { return .failure(.stopping) }
            guard state.connections.count < configuration.maxConnections else { return .failure(.serverFull) }
            let mine = state.connectionsByUID[peer.uid, default: 0]
            guard mine < configuration.maxConnectionsPerUID else { return .failure(.uidFull) }
            let id = state.nextConnectionID
            state.nextConnectionID += 1
            state.connections[id] = Entry(descriptor: client, uid: peer.uid)
            state.connectionsByUID[peer.uid] = mine + 1
            return .success(id)
        }
        let id: UInt64
        switch admission {
        case .success(let admitted): id = admitted
        case .failure(let refusal): return refuse(client, peer: peer, refusal)
        }
        ServerCounters.increment(counters.connectionsAccepted)
        ServerCounters.increment(counters.connectionsOpen)
        do {
            try SystemThread(name: "kvt-conn-\(id)") {
                self.serve(connectionID: id, descriptor: client, peer: peer, wakeDescriptor: wakeDescriptor)
            }.detach()
        } catch {
            logger.error("could not start a connection thread; closing connection", metadata: ["errno": "\(error)"])
            finish(connectionID: id)
        }
    }

    /// Why a connection is not served.
    enum Refusal: Error {
        case stopping, serverFull, uidFull
    }

    /// Answers a connection over `maxConnections` or `maxConnectionsPerUID` (or arriving during
    /// shutdown) with one error reply to the `HELLO` it is about to send, then closes it.
    private func refuse(_ client: FileDescriptor, peer: PeerCredentials, _ refusal: Refusal) {
        ServerCounters.increment(counters.connectionsRejected)
        if refusal == .uidFull { ServerCounters.increment(counters.connectionsRejectedPerUID) }
        let reason = switch refusal {
        case .stopping: "shutting down"
        case .serverFull: "maxConnections"
        case .uidFull: "maxConnectionsPerUID"
        }
        logger.warning("connection refused", metadata: ["reason": "\(reason)", "uid": "\(peer.uid)", "pid": "\(peer.pid)"])
        let error = switch refusal {
        case .stopping: ErrorReply(.unavailable, message: "kvtierd is shutting down; reconnect once it is back")
        case .serverFull: ErrorReply(.tooLarge, message: "kvtierd serves at most \(configuration.maxConnections) connections (maxConnections); close idle ones or retry later")
        case .uidFull: ErrorReply(.tooLarge, message: "uid \(peer.uid) already has \(configuration.maxConnectionsPerUID) connections open, the most kvtierd serves one uid (maxConnectionsPerUID); close idle ones, share connections, or raise maxConnectionsPerUID")
        }
        if let bytes = try? Reply.error(opcode: Opcode.hello.rawValue, error).encodeFrame(requestID: 0) {
            _ = bytes.withUnsafeBytes { try? client.sendMessage($0, wait: false) }
        }
        client.closeIgnoringErrors()
    }

    /// Deregisters a connection and closes its socket.
    func finish(connectionID: UInt64) {
        state.withLock { state in
            if let entry = state.connections.removeValue(forKey: connectionID) {
                entry.descriptor.closeIgnoringErrors()
                let left = state.connectionsByUID[entry.uid, default: 1] - 1
                state.connectionsByUID[entry.uid] = left > 0 ? left : nil
            }
        }
        counters.connectionsOpen.wrappingSubtract(1, ordering: .relaxed)
    }
}
