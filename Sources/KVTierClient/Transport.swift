@preconcurrency import Glibc
import Dispatch
import KVTierProtocol
import SystemPackage

/// One connection to kvtierd, one request in flight: each exchange (send a request, read its
/// reply) runs whole on a private serial queue, so blocking socket calls never occupy the
/// cooperative thread pool and replies cannot be matched to the wrong request.
// Invariant for @unchecked Sendable: `socket`, `decoder`, `nextRequestID` and `receiveBuffer`'s
// contents are touched only on `queue`; everything else is immutable.
final class Transport: @unchecked Sendable {
    private let queue: DispatchQueue
    private var socket: ClientSocket?
    private var decoder = FrameDecoder()
    private var nextRequestID: UInt32 = 1
    private let receiveBuffer: UnsafeMutableRawBufferPointer
    let path: String

    /// Bytes read per `recvmsg`.
    static let receiveBufferBytes = 1 << 20

    private init(socket: consuming ClientSocket, path: String) {
        self.socket = consume socket
        self.path = path
        queue = DispatchQueue(label: "kvtier.client.transport")
        receiveBuffer = .allocate(byteCount: Self.receiveBufferBytes, alignment: 16)
    }

    deinit { receiveBuffer.deallocate() }

    /// Connects to the socket at `path`. `replyTimeoutSeconds` bounds the wait for each reply (0:
    /// none).
    static func connect(path: String, replyTimeoutSeconds: Int) async throws -> Transport {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Transport, any Error>) in
            DispatchQueue.global().async {
                do {
                    let socket = try ClientSocket(connectingTo: path)
                    try socket.setReceiveTimeout(seconds: replyTimeoutSeconds)
                    continuation.resume(returning: Transport(socket: socket, path: path))
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
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Exchange, any Error>) in
            queue.async {
                do {
                    continuation.resume(returning: try self.exchangeOnQueue(request, getInline: getInline))
                } catch {
                    continuation.resume(throwing: error)
                }
            }
        }
    }

    /// `exchange` for a reply body the caller does not need, and no descriptors.
    func call(_ request: Request) async throws -> Reply {
        let result = try await exchange(request)
        Self.closeAll(result.descriptors)
        return result.reply
    }

    /// Closes the connection once the exchange in flight (if any) is over.
    func close() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            queue.async {
                self.socket = nil
                continuation.resume()
            }
        }
    }

    private func exchangeOnQueue(_ request: Request, getInline: Bool) throws(KVTierClientError) -> Exchange {
        guard socket != nil else { throw .connection("the connection to \(path) is closed") }
        let requestID = nextRequestID
        nextRequestID = nextRequestID == .max ? 1 : nextRequestID + 1
        let frame: [UInt8]
        do { frame = try request.encodeFrame(requestID: requestID) } catch { throw .invalidArgument(error.message) }
        do { try socket!.sendAll(frame) } catch { throw broken("cannot send \(request.opcode): \(error) (errno \(error.rawValue))") }

        var descriptors: [Int32] = []
        let reply: Frame
        do throws(KVTierClientError) {
            reply = try readFrame(collecting: &descriptors, opcode: request.opcode)
        } catch {
            Self.closeAll(descriptors)
            throw error
        }
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

    /// Reads until one whole frame is here; descriptors that arrive go to `descriptors`.
    private func readFrame(collecting descriptors: inout [Int32], opcode: Opcode) throws(KVTierClientError) -> Frame {
        while true {
            do {
                if let frame = try decoder.nextFrame() { return frame }
            } catch {
                throw broken("bad \(opcode) reply frame: \(error.message)", violation: true)
            }
            let received: ClientSocket.Received
            do { received = try socket!.receive(into: receiveBuffer) } catch {
                if error == .resourceTemporarilyUnavailable {
                    throw broken("no \(opcode) reply within the reply timeout; the daemon may be stuck")
                }
                throw broken("cannot receive the \(opcode) reply: \(error) (errno \(error.rawValue))")
            }
            descriptors += received.descriptors
            guard !received.controlTruncated, !received.unexpectedControl else {
                throw broken("\(opcode) reply came with control data the protocol does not send (truncated or not SCM_RIGHTS)", violation: true)
            }
            guard received.bytes > 0 else {
                throw broken("kvtierd closed the connection before answering \(opcode)")
            }
            decoder.append(UnsafeRawBufferPointer(rebasing: receiveBuffer[0..<received.bytes]))
        }
    }

    /// Drops the connection (the stream can no longer be trusted) and returns the error to throw.
    private func broken(_ message: String, violation: Bool = false) -> KVTierClientError {
        socket = nil
        return violation ? .protocolViolation(message) : .connection(message)
    }

    static func closeAll(_ descriptors: [Int32]) {
        for descriptor in descriptors { _ = Glibc.close(descriptor) }
    }
}
