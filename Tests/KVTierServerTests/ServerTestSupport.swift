@preconcurrency import Glibc
import KVTierCore
import KVTierProtocol
import KVTierSystem
import Logging
import Synchronization
import SystemPackage
import Testing
@testable import KVTierServer

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

let quietLogger = Logger(label: "kvtier.server.tests") { _ in SwiftLogNoOpLogHandler() }

/// A fresh directory under /tmp (world-traversable, so a client of another uid can reach the
/// socket), removed by `remove()`.
struct TemporaryDirectory {
    let path: String

    init() throws {
        var template = Array("/tmp/kvtier-server-XXXXXX".utf8CString)
        guard let created = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw TestFailure("mkdtemp failed: errno \(errno)")
        }
        path = String(cString: created)
        chmod(path, 0o755)
    }

    func remove() {
        var stack = [path]
        var directories: [String] = []
        while let directory = stack.popLast() {
            directories.append(directory)
            guard let handle = opendir(directory) else { continue }
            while let entry = readdir(handle) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                if name == "." || name == ".." { continue }
                let child = directory + "/" + name
                if entry.pointee.d_type == UInt8(DT_DIR) { stack.append(child) } else { unlink(child) }
            }
            closedir(handle)
        }
        for directory in directories.reversed() { rmdir(directory) }
    }
}

/// Records what the server tells the handler.
final class HandlerLog: Sendable {
    let contexts = Mutex<[ConnectionContext]>([])
    let closed = Mutex<[ConnectionContext]>([])
}

/// A door a request handler waits at until the test opens it (an event, not a sleep).
final class Gate: Sendable {
    private let stream: AsyncStream<Void>
    private let continuation: AsyncStream<Void>.Continuation

    init() { (stream, continuation) = AsyncStream.makeStream() }

    /// Returns once `open` was called (one waiter).
    func wait() async { for await _ in stream {} }
    func open() { continuation.finish() }
}

/// The handler of these tests: `STATUS` answered with the server's own counters, `RELEASE`
/// once `releaseGate` (if any) opens (a request that takes a while),
/// everything else `invalidArgument`.
struct CountersHandler: RequestHandler {
    let counters: ServerCounters
    let log = HandlerLog()
    var releaseGate: Gate?

    func handle(_ request: Request, context: ConnectionContext) -> Handling {
        log.contexts.withLock { $0.append(context) }
        switch request {
        case .status:
            return .reply(.status(StatusReply(counters: counters.snapshot())))
        case .release:
            guard let releaseGate else { return .reply(.release) }
            return .pending {
                await releaseGate.wait()
                return .release
            }
        default:
            return .reply(.failure(.invalidArgument, "the test handler answers STATUS and RELEASE only", to: request))
        }
    }

    func connectionClosed(_ context: ConnectionContext) async {
        log.closed.withLock { $0.append(context) }
    }
}

/// A running server on a socket in a temporary directory.
final class TestServer: Sendable {
    let directory: TemporaryDirectory
    let path: String
    let server: KVServer
    let handler: CountersHandler
    let running: Task<Void, any Error>

    init(configuration: ServerConfiguration = ServerConfiguration(), releaseGate: Gate? = nil,
         tenantFor: @escaping @Sendable (PeerCredentials) -> TenantID? = { TenantID($0.uid) },
         arenaProvider: KVServer.ArenaProvider? = nil) throws {
        directory = try TemporaryDirectory()
        path = directory.path + "/kvtierd.sock"
        let counters = ServerCounters()
        var handler = CountersHandler(counters: counters)
        handler.releaseGate = releaseGate
        self.handler = handler
        let listener = try UnixListener(path: path)
        let server = KVServer(listener: listener, handler: handler, configuration: configuration, counters: counters,
                              tenantFor: tenantFor, arenaProvider: arenaProvider, logger: quietLogger)
        self.server = server
        running = Task { try await server.run() }
    }

    func stop() async throws {
        server.shutdown()
        try await running.value
        directory.remove()
    }

    /// Waits (up to 5 s) until `condition` holds; the server's threads work asynchronously.
    func eventually(_ condition: () -> Bool) async -> Bool {
        let deadline = ContinuousClock.now + .seconds(30)
        while !condition() {
            if ContinuousClock.now > deadline { return false }
            try? await Task.sleep(for: .milliseconds(5))
        }
        return true
    }
}

/// Runs blocking `body` on a thread of its own: a test that blocked a thread of the cooperative
/// pool (two on a two-core machine) could starve the server's run() and handler tasks.
func onThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        do {
            try SystemThread(name: "test-client") { continuation.resume(with: Result { try body() }) }.detach()
        } catch {
            continuation.resume(throwing: error)
        }
    }
}

/// A protocol client over a raw socket, for tests; its waits run off the cooperative pool.
// Invariant for @unchecked Sendable: each test uses its client from one task, one awaited
// operation at a time, so the decoder is never touched by two threads at once.
final class TestClient: @unchecked Sendable {
    let socket: FileDescriptor
    var descriptor: Int32 { socket.rawValue }
    private var decoder = FrameDecoder()
    private let control = ControlBuffer(maxDescriptors: 4)
    private var nextRequestID: UInt32 = 1

    init(path: String) throws {
        socket = try FileDescriptor.unixSocket()
        do { try socket.connect(to: UnixSocketAddress(path)) } catch {
            socket.closeIgnoringErrors()
            throw error
        }
    }

    deinit { socket.closeIgnoringErrors() }

    func send(_ bytes: [UInt8]) throws {
        try socket.sendAll(bytes)
    }

    /// Sends `request`, returns its reply and any descriptors that came with it.
    @discardableResult
    func call(_ request: Request, requestID: UInt32? = nil) async throws -> (reply: Reply, requestID: UInt32, descriptors: [Int32]) {
        let id = requestID ?? nextRequestID
        nextRequestID &+= 1
        try send(try request.encodeFrame(requestID: id))
        let (frame, descriptors) = try await readFrame()
        return (try Reply.decode(frame), frame.header.requestID, descriptors)
    }

    func hello(capabilities: Capabilities = []) async throws -> HelloReply {
        let (reply, _, descriptors) = try await call(.hello(Hello(capabilities: capabilities, clientName: "kvtier-server-tests")))
        for descriptor in descriptors { FileDescriptor(rawValue: descriptor).closeIgnoringErrors() }
        guard case .hello(let hello) = reply else { throw TestFailure("HELLO answered with \(reply)") }
        return hello
    }

    /// The next frame, waiting at most `timeout`.
    func readFrame(timeout: Duration = .seconds(30)) async throws -> (Frame, [Int32]) {
        try await onThread { try self.readFrameBlocking(timeout: timeout) }
    }

    /// Whether the server closes the connection within `timeout` (end of stream or reset),
    /// discarding whatever else arrives.
    func isClosedByServer(timeout: Duration = .seconds(30)) async -> Bool {
        (try? await onThread { self.isClosedByServerBlocking(timeout: timeout) }) ?? false
    }

    private func readFrameBlocking(timeout: Duration) throws -> (Frame, [Int32]) {
        var descriptors: [Int32] = []
        let deadline = ContinuousClock.now + timeout
        while true {
            if let frame = try decoder.nextFrame() { return (frame, descriptors) }
            let (count, received) = try receive(until: deadline)
            descriptors += received
            guard count > 0 else { throw TestFailure("connection closed before a whole frame came") }
        }
    }

    private func isClosedByServerBlocking(timeout: Duration) -> Bool {
        let deadline = ContinuousClock.now + timeout
        while true {
            do {
                let (count, descriptors) = try receive(until: deadline)
                for descriptor in descriptors { FileDescriptor(rawValue: descriptor).closeIgnoringErrors() }
                if count == 0 { return true }
            } catch let error as Errno where error == .connectionReset {
                return true
            } catch {
                return false
            }
        }
    }

    func shutdownSending() { socket.shutdown(.send) }

    private func receive(until deadline: ContinuousClock.Instant) throws -> (Int, [Int32]) {
        let remaining = deadline - ContinuousClock.now
        guard remaining > .zero else { throw TestFailure("timed out waiting for the server") }
        guard try Poll.waitReadable(socket, timeoutMillis: Poll.millisecondsRoundedUp(remaining)) else {
            return try receive(until: deadline)
        }
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        let received = try buffer.withUnsafeMutableBytes { raw in try socket.receiveMessage(into: raw, control: control) }
        decoder.append(Array(buffer[..<received.bytes]))
        return (received.bytes, received.descriptors.map(\.rawValue))
    }
}

/// A header as raw bytes, for frames the encoder would refuse to build.
func rawHeader(bodyBytes: UInt32, opcode: UInt16, flags: UInt16, requestID: UInt32, status: UInt32 = 0) -> [UInt8] {
    var writer = ByteWriter(capacity: 16)
    writer.u32(bodyBytes)
    writer.u16(opcode)
    writer.u16(flags)
    writer.u32(requestID)
    writer.u32(status)
    return writer.bytes
}

/// The error a reply carries, or nil for a success.
func wireError(of reply: Reply) -> WireError? {
    if case .error(_, let error) = reply { return error.error }
    return nil
}
