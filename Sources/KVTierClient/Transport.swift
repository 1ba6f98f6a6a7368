@preconcurrency import Glibc
import Dispatch
import KVTierCore
import KVTierProtocol
import KVTierSystem
import Synchronization
import SystemPackage

/// One connection to kvtierd, one exchange at a time (send a request, read its reply), taken in
/// the order callers arrive, so replies cannot be matched to the wrong request.
///
/// An exchange runs on the calling thread: the request is sent and the reply awaited there for
/// up to `inlineReplyWaitMicros`, far longer than most replies take (a daemon answering from
/// RAM replies in microseconds). Hopping to another thread and back per request cost more than
/// the whole round trip (docs/benchmarks.md, Serving). A reply that takes longer is awaited on a private queue, so a slow daemon never
/// holds a thread of the cooperative pool for long; so is a whole exchange whose request is
/// large (an inline `PUT`), whose send may block.
///
/// `RELEASE` may be sent without waiting (`sendWithoutWaiting`): its reply is read, and dropped,
/// by the next exchange. The daemon answers requests in order, so every later request sees the
/// release done.
// Invariant for @unchecked Sendable: `socket`, `decoder`, `nextRequestID`, `unanswered`,
// `pendingDescriptors` and the contents of `receiveBuffer` and `controlBuffer` are touched only
// by the holder of `gate` (entering and leaving it orders the accesses of successive holders);
// the rest is immutable.
final class Transport: @unchecked Sendable {
    private let gate = AsyncGate()
    private let queue: DispatchQueue
    /// The connected socket (blocking, with a receive timeout); nil once closed or broken.
    private var socket: FileDescriptor?
    private var decoder = FrameDecoder()
    private var nextRequestID: UInt32 = 1
    /// Requests sent without waiting, oldest first: their replies come before any other.
    private var unanswered: [(requestID: UInt32, opcode: Opcode)] = []
    private let receiveBuffer: UnsafeMutableRawBufferPointer
    private let controlBuffer = ControlBuffer(maxDescriptors: Transport.maxDescriptors)
    /// 0: wait forever.
    private let replyTimeoutSeconds: Int
    let path: String

    /// Bytes read per `recvmsg`.
    static let receiveBufferBytes = 1 << 20
    /// How long an exchange waits for its reply on the calling thread before moving the wait to
    /// the private queue (the socket's SO_RCVTIMEO).
    static let inlineReplyWaitMicros = 2_000
    /// Requests at least this large are exchanged on the private queue from the start.
    static let largeRequestBytes = 1 << 20
    /// Requests sent without waiting that may be outstanding; the next one waits for the
    /// oldest reply first.
    static let maxUnanswered = 16
    /// The most descriptors one message may bring: the protocol sends two (HELLO's arenas); room
    /// for more lets us see (and close) extra ones instead of the kernel truncating silently.
    static let maxDescriptors = 4

    private init(socket: FileDescriptor, path: String, replyTimeoutSeconds: Int) {
        self.socket = socket
        self.path = path
        self.replyTimeoutSeconds = replyTimeoutSeconds
        queue = DispatchQueue(label: "kvtier.client.transport")
        receiveBuffer = .allocate(byteCount: Self.receiveBufferBytes, alignment: 16)
    }

    deinit {
        socket?.closeIgnoringErrors()
        receiveBuffer.deallocate()
    }

    /// A blocking connection to `path` whose receives give up after `inlineReplyWaitMicros`.
    private static func connectedSocket(path: String) throws(Errno) -> FileDescriptor {
        let address = try UnixSocketAddress(path)
        let socket = try FileDescriptor.unixSocket()
        do throws(Errno) {
            try socket.connect(to: address)
            try socket.setTimeout(.receive, micros: Self.inlineReplyWaitMicros)
            return socket
        } catch {
            socket.closeIgnoringErrors()
            throw error
        }
    }

    /// Closes the socket; later exchanges fail.
    private func dropSocket() {
        socket?.closeIgnoringErrors()
        socket = nil
    }

    /// Connects to the socket at `path`. `replyTimeoutSeconds` bounds the wait for each reply (0:
    /// none).
    static func connect(path: String, replyTimeoutSeconds: Int) async throws -> Transport {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Transport, any Error>) in
            DispatchQueue.global().async {
                do {
                    let socket = try connectedSocket(path: path)
                    continuation.resume(returning: Transport(socket: socket, path: path, replyTimeoutSeconds: replyTimeoutSeconds))
                } catch let error as Errno {
                    let hint = error == .noSuchFileOrDirectory || error == .connectionRefused ? "; is kvtierd running?" : ""
                    continuation.resume(throwing: KVTierClientError.connection("cannot connect to \(path): \(error) (errno \(error.rawValue))\(hint)"))
                } catch {
                    continuation.resume(throwing: KVTierClientError.connection("cannot connect to \(path): \(error)"))
                }
            }
        }
    }

    /// A reply and the descriptors that came with it (the caller owns them).
    struct Exchange: Sendable {
        var reply: Reply
        var descriptors: [Int32]
    }

    /// Sends `request` and waits for its reply. An error reply is thrown as
    /// `KVTierClientError.server`; `getInline` is the inline flag of a `GET` request.
    func exchange(_ request: Request, getInline: Bool = false) async throws -> Exchange {
        await gate.enter()
        defer { gate.leave() }
        let frame = try encode(request)
        if frame.bytes.count >= Self.largeRequestBytes {
            return try await onQueue { () throws(KVTierClientError) in
                try self.send(frame.bytes, request.opcode)
                return try self.finishExchange(request, requestID: frame.requestID, getInline: getInline)
            }
        }
        try send(frame.bytes, request.opcode)
        if try readUnanswered(deadline: nil), let reply = try readFrame(request.opcode, deadline: nil) {
            return try decode(reply, request, requestID: frame.requestID, getInline: getInline)
        }
        // The reply is slow: wait for it off the cooperative pool.
        return try await onQueue { () throws(KVTierClientError) in
            try self.finishExchange(request, requestID: frame.requestID, getInline: getInline)
        }
    }

    /// Sends `request` (a small one whose reply has no descriptors, e.g. `RELEASE`) without
    /// waiting for its reply; the next exchange reads it and drops it, error or not.
    func sendWithoutWaiting(_ request: Request) async throws {
        await gate.enter()
        defer { gate.leave() }
        if unanswered.count >= Self.maxUnanswered, try !readUnanswered(deadline: nil) {
            try await onQueue { () throws(KVTierClientError) in
                guard try self.readUnanswered(deadline: self.replyDeadline()) else {
                    throw self.broken("no reply to \(self.unanswered.first?.opcode ?? .release) within \(self.replyTimeoutSeconds) s; the daemon may be stuck")
                }
            }
        }
        let frame = try encode(request)
        try send(frame.bytes, request.opcode)
        unanswered.append((frame.requestID, request.opcode))
    }

    /// `exchange` for a reply body the caller does not need, and no descriptors.
    func call(_ request: Request) async throws -> Reply {
        let result = try await exchange(request)
        Self.closeAll(result.descriptors)
        return result.reply
    }

    /// Closes the connection once the exchange in flight (if any) is over.
    func close() async {
        await gate.enter()
        dropSocket()
        gate.leave()
    }

    // MARK: steps of an exchange (gate held)

    /// Runs `body` on the private queue, the calling task waiting.
    private func onQueue<T: Sendable>(_ body: @escaping @Sendable () throws(KVTierClientError) -> T) async throws -> T {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
            queue.async {
                do throws(KVTierClientError) {
                    continuation.resume(returning: try body())
                } catch {
                    continuation.resume(throwing: error)
                }
            }
        }
    }

    private func encode(_ request: Request) throws(KVTierClientError) -> (bytes: [UInt8], requestID: UInt32) {
        guard socket != nil else { throw .connection("the connection to \(path) is closed") }
        let requestID = nextRequestID
        nextRequestID = nextRequestID == .max ? 1 : nextRequestID + 1
        do { return (try request.encodeFrame(requestID: requestID), requestID) } catch { throw .invalidArgument(error.message) }
    }

    private func send(_ frame: [UInt8], _ opcode: Opcode) throws(KVTierClientError) {
        guard socket != nil else { throw .connection("the connection to \(path) is closed") }
        let socket = self.socket!
        do { try socket.sendAll(frame) } catch { throw broken("cannot send \(opcode): \(error) (errno \(error.rawValue))") }
    }

    private func replyDeadline() -> ContinuousClock.Instant? {
        replyTimeoutSeconds > 0 ? ContinuousClock.now + .seconds(replyTimeoutSeconds) : nil
    }

    /// Reads the replies of requests sent without waiting, dropping them (they carry no
    /// descriptors; an error reply is the caller's loss, as with a `try?`). False when the
    /// wait ran out first (see `readFrame`).
    private func readUnanswered(deadline: ContinuousClock.Instant?) throws(KVTierClientError) -> Bool {
        while let (requestID, opcode) = unanswered.first {
            guard let reply = try readFrame(opcode, deadline: deadline) else { return false }
            unanswered.removeFirst()
            let descriptors = takeDescriptors()
            Self.closeAll(descriptors)
            guard reply.header.requestID == requestID, reply.header.opcode == opcode.rawValue, descriptors.isEmpty else {
                throw broken("reply \(reply.header.requestID) (opcode 0x\(String(reply.header.opcode, radix: 16))) does not answer "
                             + "request \(requestID) (\(opcode))", violation: true)
            }
        }
        return true
    }

    /// Waits (blocking, on the queue, until the reply timeout) for the replies still owed and
    /// this exchange's reply, and decodes it.
    private func finishExchange(_ request: Request, requestID: UInt32, getInline: Bool) throws(KVTierClientError) -> Exchange {
        let deadline = replyDeadline()
        guard try readUnanswered(deadline: deadline), let reply = try readFrame(request.opcode, deadline: deadline) else {
            throw broken("no \(request.opcode) reply within \(replyTimeoutSeconds) s; the daemon may be stuck")
        }
        return try decode(reply, request, requestID: requestID, getInline: getInline)
    }

    /// Checks that `reply` answers the request and decodes it, with the descriptors it brought.
    private func decode(_ reply: Frame, _ request: Request, requestID: UInt32, getInline: Bool) throws(KVTierClientError) -> Exchange {
        let descriptors = takeDescriptors()
        do throws(KVTierClientError) {
            guard reply.header.requestID == requestID, reply.header.opcode == request.opcode.rawValue else {
                throw broken("reply \(reply.header.requestID) (opcode 0x\(String(reply.header.opcode, radix: 16))) does not answer "
                             + "request \(requestID) (\(request.opcode))", violation: true)
            }
            guard reply.header.flags.contains(.fileDescriptors) == !descriptors.isEmpty else {
                throw broken("\(request.opcode) reply announces \(reply.header.flags.contains(.fileDescriptors) ? "a" : "no") descriptor "
                             + "but \(descriptors.count) came", violation: true)
            }
            let decoded: Reply
            do { decoded = try Reply.decode(reply, getInline: getInline) } catch {
                throw broken("undecodable \(request.opcode) reply: \(error.message)", violation: true)
            }
            if case .error(_, let body) = decoded { throw KVTierClientError.server(body.error, body.message) }
            return Exchange(reply: decoded, descriptors: descriptors)
        } catch {
            Self.closeAll(descriptors)
            throw error
        }
    }

    /// Descriptors received since the last frame was taken: the protocol attaches them to a
    /// frame's first byte, and only the `HELLO` reply has one, so they belong to the frame
    /// `readFrame` returns next.
    private var pendingDescriptors: [Int32] = []

    private func takeDescriptors() -> [Int32] {
        defer { pendingDescriptors = [] }
        return pendingDescriptors
    }

    /// The next whole frame. With `deadline` nil, reads on the calling thread and gives up (nil)
    /// when a read waits `inlineReplyWaitMicros` without data; the bytes read so far stay
    /// buffered for the next call. Otherwise polls until `deadline` (nil when it passes).
    private func readFrame(_ opcode: Opcode, deadline: ContinuousClock.Instant?) throws(KVTierClientError) -> Frame? {
        while true {
            guard socket != nil else { throw .connection("the connection to \(path) is closed") }
            do {
                if let frame = try decoder.nextFrame() { return frame }
            } catch {
                throw broken("bad \(opcode) reply frame: \(error.message)", violation: true)
            }
            if let deadline, !(try waitReadable(until: deadline)) { return nil }
            let received: ReceivedMessage
            do { received = try socket!.receiveMessage(into: receiveBuffer, control: controlBuffer) } catch {
                if error == .resourceTemporarilyUnavailable {
                    if deadline == nil { return nil }
                    continue
                }
                throw broken("cannot receive the \(opcode) reply: \(error) (errno \(error.rawValue))")
            }
            pendingDescriptors += received.descriptors.map(\.rawValue)
            guard !received.controlTruncated, !received.unexpectedControl else {
                throw broken("\(opcode) reply came with control data the protocol does not send (truncated or not SCM_RIGHTS)", violation: true)
            }
            guard received.bytes > 0 else {
                throw broken("kvtierd closed the connection before answering \(opcode)")
            }
            decoder.append(UnsafeRawBufferPointer(rebasing: receiveBuffer[0..<received.bytes]))
        }
    }

    /// Polls the socket until it is readable (true) or `deadline` passes (false).
    private func waitReadable(until deadline: ContinuousClock.Instant) throws(KVTierClientError) -> Bool {
        while true {
            let remaining = deadline - ContinuousClock.now
            guard remaining > .zero else { return false }
            do {
                if try Poll.waitReadable(socket!, timeoutMillis: Poll.millisecondsRoundedUp(remaining)) { return true }
            } catch {
                throw broken("cannot wait for a reply: \(error) (errno \(error.rawValue))")
            }
        }
    }

    /// Drops the connection (the stream can no longer be trusted) and returns the error to throw.
    private func broken(_ message: String, violation: Bool = false) -> KVTierClientError {
        dropSocket()
        unanswered = []
        Self.closeAll(pendingDescriptors)
        pendingDescriptors = []
        return violation ? .protocolViolation(message) : .connection(message)
    }

    static func closeAll(_ descriptors: [Int32]) {
        for descriptor in descriptors { FileDescriptor(rawValue: descriptor).closeIgnoringErrors() }
    }
}
