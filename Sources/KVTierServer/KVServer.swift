@preconcurrency import Glibc
import KVTierCore
import KVTierProtocol
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
    let state = Mutex(State())

    struct State {
        enum Phase { case idle, running, stopped }
        var phase = Phase.idle
        var stopRequested = false
        var stopWaiter: CheckedContinuation<Void, Never>?
        /// Readable once shutdown begins (one byte, never drained): wakes every polling thread.
        var wake: (read: Int32, write: Int32)?
        var acceptLoopRunning = false
        var acceptFailure: ServerError?
        var nextConnectionID: UInt64 = 1
        var connections: [UInt64: Entry] = [:]
    }

    struct Entry {
        /// Closed only under the state lock, when the entry is removed, so a forced shutdown
        /// never touches a reused descriptor number.
        var descriptor: Int32
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
    }

    deinit {
        // Every thread that polls the wake pipe holds a reference to self, so none is left.
        if let wake = state.withLock({ $0.wake }) {
            SocketSystem.close(wake.read)
            SocketSystem.close(wake.write)
        }
    }

    /// Connections being served now.
    public var openConnections: Int { state.withLock { $0.connections.count } }

    /// Serves until `shutdown()`; throws when the listener fails (the server shuts down first).
    public func run() async throws {
        let wake: (read: Int32, write: Int32)
        do { wake = try SocketSystem.makePipe() } catch { throw ServerError.system(operation: "pipe2", error) }
        let stopAlready = state.withLock { state in
            precondition(state.phase == .idle, "KVServer.run() is called once")
            state.phase = .running
            state.wake = wake
            state.acceptLoopRunning = true
            return state.stopRequested
        }
        if stopAlready { try? SocketSystem.write(wake.write, byte: 1) }
        do {
            try ServerThread.start(name: "kvt-accept") { self.acceptLoop(wakeDescriptor: wake.read) }
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
        let (waiter, wakeWrite) = state.withLock { state -> (CheckedContinuation<Void, Never>?, Int32?) in
            guard !state.stopRequested else { return (nil, nil) }
            state.stopRequested = true
            defer { state.stopWaiter = nil }
            return (state.stopWaiter, state.wake?.write)
        }
        if let wakeWrite { try? SocketSystem.write(wakeWrite, byte: 1) }
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
            for entry in state.connections.values { SocketSystem.shutdown(entry.descriptor) }
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

    private func acceptLoop(wakeDescriptor: Int32) {
        defer { state.withLock { $0.acceptLoopRunning = false } }
        while true {
            var fds = [
                pollfd(fd: listener.descriptor, events: Int16(POLLIN), revents: 0),
                pollfd(fd: wakeDescriptor, events: Int16(POLLIN), revents: 0),
            ]
            do { _ = try SocketSystem.poll(&fds, timeoutMillis: -1) } catch {
                return failAccepting(.system(operation: "poll on listener", error))
            }
            if fds[1].revents != 0 { return }
            if fds[0].revents & Int16(POLLERR | POLLNVAL) != 0 {
                return failAccepting(.system(operation: "poll on listener", .badFileDescriptor))
            }
            guard fds[0].revents & Int16(POLLIN) != 0 else { continue }
            let client: Int32
            do {
                client = try SocketSystem.accept(listener.descriptor)
            } catch {
                switch error.rawValue {
                case EAGAIN, ECONNABORTED, EPROTO, EPERM:
                    continue
                case EMFILE, ENFILE, ENOBUFS, ENOMEM:
                    logger.warning("accept failed for lack of resources; retrying shortly", metadata: ["errno": "\(error)"])
                    var pause = [pollfd(fd: wakeDescriptor, events: Int16(POLLIN), revents: 0)]
                    _ = try? SocketSystem.poll(&pause, timeoutMillis: 100)
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
    private func admit(_ client: Int32, wakeDescriptor: Int32) {
        let peer: PeerCredentials
        do { peer = try PeerCredentials(ofSocket: client) } catch {
            logger.warning("could not read peer credentials; closing connection", metadata: ["errno": "\(error)"])
            SocketSystem.close(client)
            return
        }
        let id = state.withLock { state -> UInt64? in
            guard !state.stopRequested, state.connections.count < configuration.maxConnections else { return nil }
            let id = state.nextConnectionID
            state.nextConnectionID += 1
            state.connections[id] = Entry(descriptor: client)
            return id
        }
        guard let id else { return refuse(client, peer: peer) }
        ServerCounters.increment(counters.connectionsAccepted)
        ServerCounters.increment(counters.connectionsOpen)
        do {
            try ServerThread.start(name: "kvt-conn-\(id)") {
                self.serve(connectionID: id, descriptor: client, peer: peer, wakeDescriptor: wakeDescriptor)
            }
        } catch {
            logger.error("could not start a connection thread; closing connection", metadata: ["errno": "\(error)"])
            finish(connectionID: id)
        }
    }

    /// Answers a connection over `maxConnections` (or arriving during shutdown) with one error
    /// reply to the `HELLO` it is about to send, then closes it.
    private func refuse(_ client: Int32, peer: PeerCredentials) {
        ServerCounters.increment(counters.connectionsRejected)
        let stopping = isStopping
        logger.warning("connection refused", metadata: [
            "reason": "\(stopping ? "shutting down" : "maxConnections")", "uid": "\(peer.uid)", "pid": "\(peer.pid)",
        ])
        let error = stopping
            ? ErrorReply(.unavailable, message: "kvtierd is shutting down; reconnect once it is back")
            : ErrorReply(.tooLarge, message: "kvtierd serves at most \(configuration.maxConnections) connections; close idle ones or retry later")
        if let bytes = try? Reply.error(opcode: Opcode.hello.rawValue, error).encodeFrame(requestID: 0) {
            _ = bytes.withUnsafeBytes { try? SocketSystem.send(client, $0) }
        }
        SocketSystem.close(client)
    }

    /// Deregisters a connection and closes its socket.
    func finish(connectionID: UInt64) {
        state.withLock { state in
            if let entry = state.connections.removeValue(forKey: connectionID) { SocketSystem.close(entry.descriptor) }
        }
        counters.connectionsOpen.wrappingSubtract(1, ordering: .relaxed)
    }
}
