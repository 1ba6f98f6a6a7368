import KVTierCore
import KVTierProtocol

/// What the server knows about a connection once its `HELLO` succeeded.
public struct ConnectionContext: Sendable, Hashable {
    /// Unique for the life of the server process; never reused.
    public var connectionID: UInt64
    /// The owner of everything this connection touches: the peer's uid, or what the server's
    /// tenant mapping made of it.
    public var tenant: TenantID
    /// The peer as the kernel saw it at accept time.
    public var peer: PeerCredentials
    /// The protocol version agreed in `HELLO`.
    public var protocolVersion: UInt16
    /// The client's self-description from `HELLO` (for logs; not trusted for anything).
    public var clientName: String
    /// Whether this connection was given the tenant's arena (shared memory); otherwise page bytes
    /// travel inline.
    public var sharedMemory: Bool

    public init(connectionID: UInt64, tenant: TenantID, peer: PeerCredentials, protocolVersion: UInt16,
                clientName: String, sharedMemory: Bool) {
        self.connectionID = connectionID
        self.tenant = tenant
        self.peer = peer
        self.protocolVersion = protocolVersion
        self.clientName = clientName
        self.sharedMemory = sharedMemory
    }
}

/// What a handler makes of a request: the reply at once, or the rest of the work.
public enum Handling: Sendable {
    /// The reply, given on the connection's thread.
    case reply(Reply)
    /// Work that waits (disk I/O, eviction, durability): the server runs it as a task on the
    /// cooperative pool and replies with its result.
    case pending(@Sendable () async -> Reply)
}

/// The request semantics behind the transport (the store). The server answers `HELLO` and
/// `PING` itself and passes every other request of a connection that said `HELLO`, one at a time
/// per connection, in order; different connections call concurrently.
public protocol RequestHandler: Sendable {
    /// Plans `request` once, on the connection's thread: the reply when it can be given without
    /// waiting for anything (no disk I/O, no eviction, no lock held for long), which saves the
    /// request a trip through the cooperative pool (it dominates small requests); otherwise the
    /// work left, which the server runs as a task. A reply is the matching reply case, or
    /// `.error(opcode:_:)` with the request's opcode (a reply of another opcode is replaced by an
    /// `internal` error). Errors keep the connection open. Cancellation of pending work means
    /// the server is shutting down and has given up waiting.
    func handle(_ request: Request, context: ConnectionContext) -> Handling

    /// The connection is gone (peer closed, protocol error, timeout or shutdown): release its
    /// leases. Called exactly once per context that `handle` could have seen, after its last
    /// reply.
    func connectionClosed(_ context: ConnectionContext) async
}

extension Reply {
    /// An error reply to `request`, for handlers: `Reply.failure(.notFound, "no model 0x…", to: request)`.
    public static func failure(_ error: WireError, _ message: String, to request: Request) -> Reply {
        .error(opcode: request.opcode.rawValue, ErrorReply(error, message: message))
    }
}
