import KVTierCore
import KVTierProtocol
import KVTierSystem
import Logging
import SystemPackage

/// One connection's protocol: `HELLO` first, then requests answered in order until the peer
/// leaves, breaks the protocol, times out, or the server stops.
extension KVServer {
    /// What answering one frame produced.
    struct Response {
        var reply: Reply
        /// Sent with SCM_RIGHTS (the arenas, on a `HELLO` reply offering shared memory).
        var descriptors: [Int32] = []
        /// Close the connection after the reply: the stream can no longer be trusted.
        var closes = false
    }

    /// The connection thread's body.
    func serve(connectionID: UInt64, descriptor: FileDescriptor, peer: PeerCredentials, wakeDescriptor: FileDescriptor) {
        var logger = self.logger
        logger[metadataKey: "connection"] = "\(connectionID)"
        logger.debug("connection opened", metadata: ["uid": "\(peer.uid)", "gid": "\(peer.gid)", "pid": "\(peer.pid)"])
        let connection = Connection(descriptor: descriptor, wakeDescriptor: wakeDescriptor, configuration: configuration,
                                    budget: frameBudget, uid: peer.uid)
        var context: ConnectionContext?
        let reason = serveFrames(connection, connectionID: connectionID, peer: peer, context: &context, logger: logger)
        if let context {
            let handler = self.handler
            TaskBridge.awaitTask { await handler.connectionClosed(context) }
        }
        finish(connectionID: connectionID)
        logger.debug("connection closed", metadata: ["reason": "\(reason)"])
    }

    /// Reads and answers frames; returns why the connection ends.
    private func serveFrames(_ connection: Connection, connectionID: UInt64, peer: PeerCredentials,
                             context: inout ConnectionContext?, logger: Logger) -> String {
        while true {
            switch connection.nextEvent() {
            case .frame(let frame):
                ServerCounters.increment(counters.framesReceived)
                let response = respond(to: frame, connectionID: connectionID, peer: peer, context: &context, logger: logger)
                connection.helloAnswered = context != nil
                guard send(response, requestID: frame.header.requestID, on: connection, logger: logger) else { return "reply not delivered" }
                if response.closes { return "protocol error" }
                if isStopping { return "server stopping" }
            case .protocolError(let error, let header):
                ServerCounters.increment(counters.protocolErrors)
                logger.debug("protocol error; closing connection", metadata: ["error": "\(error)"])
                sendError(ErrorReply(error), header: header, on: connection, logger: logger)
                return "protocol error"
            case .timedOut(let header, let admitted):
                ServerCounters.increment(counters.frameTimeouts)
                let seconds = Self.seconds(configuration.frameTimeout)
                let message = admitted
                    ? "a frame took longer than \(seconds) s from its first byte to its last; send each frame whole, promptly"
                    : "a \(header.map { "\(Int($0.bodyBytes) + ProtocolLimits.frameHeaderBytes)-byte " } ?? "")frame waited \(seconds) s (frameTimeout) for room among the frames kvtierd buffers (maxBufferedFrameBytes \(configuration.maxBufferedFrameBytes), maxBufferedFrameBytesPerUID \(configuration.maxBufferedFrameBytesPerUID)); retry, send fewer large inline frames at once, or use shared memory"
                sendError(ErrorReply(.timeout, message: message), header: header, on: connection, logger: logger)
                return admitted ? "frame timeout" : "frame not admitted to the frame budget"
            case .idle(let beforeHello):
                if beforeHello {
                    ServerCounters.increment(counters.handshakeTimeouts)
                    sendError(ErrorReply(.timeout, message: "no HELLO within \(Self.seconds(configuration.handshakeTimeout)) s of connecting (handshakeTimeout); send HELLO first, at once"),
                              header: nil, on: connection, logger: logger)
                    return "handshake timeout"
                }
                // No reply: nothing was asked. The client sees the stream end and reconnects.
                ServerCounters.increment(counters.idleTimeouts)
                return "idle timeout"
            case .peerClosed(let header, let receivedBytes):
                guard receivedBytes > 0 else { return "peer closed" }
                ServerCounters.increment(counters.protocolErrors)
                // The peer may have shut down only its sending side: tell it why nothing came back.
                sendError(ErrorReply(.malformed, message: "the connection ended \(receivedBytes) bytes into a frame; send whole frames"),
                          header: header, on: connection, logger: logger)
                return "peer closed mid-frame"
            case .stopping:
                return "server stopping"
            case .failed(let error):
                return "socket error \(error)"
            }
        }
    }

    private func respond(to frame: Frame, connectionID: UInt64, peer: PeerCredentials,
                         context: inout ConnectionContext?, logger: Logger) -> Response {
        let request: Request
        do {
            request = try Request.decode(frame)
        } catch {
            ServerCounters.increment(counters.protocolErrors)
            return Response(reply: .error(opcode: frame.header.opcode, ErrorReply(error)), closes: error.closesConnection)
        }
        guard let context else {
            guard case .hello(let hello) = request else {
                return Response(reply: .failure(.outOfOrder, "\(request.opcode) before HELLO; send HELLO first on every connection", to: request))
            }
            return self.hello(hello, connectionID: connectionID, peer: peer, context: &context, logger: logger)
        }
        switch request {
        case .hello:
            return Response(reply: .failure(.outOfOrder, "HELLO was already answered on this connection; open a new connection to negotiate again", to: request))
        case .ping:
            return Response(reply: .ping)
        default:
            return Response(reply: dispatch(request, context: context, logger: logger))
        }
    }

    /// Negotiates the version, names the tenant and offers the arena.
    private func hello(_ hello: Hello, connectionID: UInt64, peer: PeerCredentials,
                       context: inout ConnectionContext?, logger: Logger) -> Response {
        let request = Request.hello(hello)
        guard hello.minVersion <= hello.maxVersion else {
            return Response(reply: .failure(.unsupportedVersion, "minVersion \(hello.minVersion) is above maxVersion \(hello.maxVersion); send a valid range", to: request))
        }
        guard let version = ProtocolVersion.negotiate(minVersion: hello.minVersion, maxVersion: hello.maxVersion) else {
            return Response(reply: .failure(.unsupportedVersion, "this kvtierd speaks versions \(ProtocolVersion.oldestSupported)...\(ProtocolVersion.current) and the client \(hello.minVersion)...\(hello.maxVersion); upgrade the older side", to: request))
        }
        guard let tenant = tenantFor(peer) else {
            return Response(reply: .failure(.permissionDenied, "uid \(peer.uid) (gid \(peer.gid)) is refused by this kvtierd's tenant mapping (docs/configuration.md, sharedTenantGroups: uids of 2^31 and above cannot connect while groups share tenants)", to: request))
        }
        var arena: TenantArenas?
        if hello.capabilities.contains(.sharedMemory), let arenaProvider {
            do {
                arena = try arenaProvider(tenant)
            } catch {
                logger.error("tenant arena unavailable; connection goes on without shared memory", metadata: ["tenant": "\(tenant)", "error": "\(error)"])
            }
            if let offered = arena, !offered.isUsable {
                logger.error("arena provider returned an unusable arena; connection goes on without shared memory", metadata: [
                    "tenant": "\(tenant)", "pages": "\(offered.pages)", "staging": "\(offered.staging)",
                ])
                arena = nil
            }
        }
        context = ConnectionContext(connectionID: connectionID, tenant: tenant, peer: peer, protocolVersion: version,
                                    clientName: hello.clientName, sharedMemory: arena != nil)
        logger.debug("hello", metadata: ["tenant": "\(tenant)", "client": "\(hello.clientName)", "sharedMemory": "\(arena != nil)"])
        let reply = HelloReply(version: version, tenant: tenant, capabilities: arena == nil ? [] : .sharedMemory,
                               maxControlBody: UInt32(clamping: configuration.maxControlBody),
                               maxInlineBody: UInt32(clamping: configuration.maxInlineBody),
                               arenaBytes: UInt64(arena?.pages.bytes ?? 0), stagingBytes: UInt64(arena?.staging.bytes ?? 0))
        return Response(reply: .hello(reply), descriptors: arena.map { [$0.pages.descriptor, $0.staging.descriptor] } ?? [])
    }

    /// Runs the handler for one request: on this thread, and the work it leaves pending as a task
    /// registered so a forced shutdown can cancel it.
    private func dispatch(_ request: Request, context: ConnectionContext, logger: Logger) -> Reply {
        let handler = self.handler
        let reply: Reply
        switch handler.handle(request, context: context) {
        case .reply(let immediate):
            reply = immediate
            ServerCounters.increment(counters.immediateReplies)
        case .pending(let rest):
            reply = TaskBridge.awaitTask(rest, started: { task in
                state.withLock { $0.connections[context.connectionID]?.task = task }
            })
            state.withLock { $0.connections[context.connectionID]?.task = nil }
        }
        ServerCounters.increment(counters.handlerReplies)
        guard reply.opcode == request.opcode.rawValue, reply.frameFlags == .reply else {
            logger.error("handler replied to a request with another opcode", metadata: [
                "request": "\(request.opcode)", "replyOpcode": "\(reply.opcode)",
            ])
            return .failure(.internal, "kvtierd answered \(request.opcode) with a reply of opcode \(reply.opcode); this is a bug, please report it", to: request)
        }
        return reply
    }

    /// Encodes and writes a reply; false when the connection is unusable.
    private func send(_ response: Response, requestID: UInt32, on connection: Connection, logger: Logger) -> Bool {
        var bytes: [UInt8]
        var descriptors = response.descriptors
        do {
            bytes = try response.reply.encodeFrame(requestID: requestID)
        } catch {
            logger.error("reply does not encode; sending an internal error instead", metadata: ["opcode": "\(response.reply.opcode)", "error": "\(error)"])
            let replacement = ErrorReply(.internal, message: "kvtierd built a reply it cannot send (\(error)); this is a bug, please report it")
            guard let encoded = try? Reply.error(opcode: response.reply.opcode, replacement).encodeFrame(requestID: requestID) else { return false }
            bytes = encoded
            descriptors = []
        }
        do {
            try connection.send(bytes, descriptors: descriptors)
            return true
        } catch {
            logger.debug("reply not delivered; closing connection", metadata: ["errno": "\(error)"])
            return false
        }
    }

    /// Best effort: the error reply before closing, addressed to `header` when it was read.
    private func sendError(_ error: ErrorReply, header: FrameHeader?, on connection: Connection, logger: Logger) {
        let response = Response(reply: .error(opcode: header?.opcode ?? 0, error), closes: true)
        _ = send(response, requestID: header?.requestID ?? 0, on: connection, logger: logger)
    }

    static func seconds(_ duration: Duration) -> Double {
        Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
    }
}
