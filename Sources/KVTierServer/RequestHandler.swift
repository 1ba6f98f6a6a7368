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

/// The request semantics behind the transport (the store). The server answers `HELLO` and
/// `PING` itself and passes every other request of a connection that said `HELLO`, one at a time
/// per connection, in order; different connections call concurrently.
public protocol RequestHandler: Sendable {
    /// The reply to `request`: the matching reply case, or `.error(opcode:_:)` with the
    /// request's opcode (a reply of another opcode is replaced by an `internal` error). Errors
    /// keep the connection open. Cancellation means the server is shutting down and has given
    /// up waiting.
    func handle(_ request: Request, context: ConnectionContext) async -> Reply

    /// The reply to `request` when it can be given at once, without waiting for anything (no
    /// disk I/O, no eviction, no lock held for long): called on the connection's thread before
    /// `handle`, which runs only when this returns nil. Saves the request a trip through the
    /// cooperative pool, which dominates small requests. Same reply rules as `handle`; the
    /// default answers nothing immediately.
    func handleImmediately(_ request: Request, context: ConnectionContext) -> Reply?

    /// The connection is gone (peer closed, protocol error, timeout or shutdown): release its
    /// leases. Called exactly once per context that `handle` could have seen, after its last
    /// `handle` returned.
    func connectionClosed(_ context: ConnectionContext) async
}

extension RequestHandler {
    public func handleImmediately(_ request: Request, context: ConnectionContext) -> Reply? { nil }
}

extension Reply {
    /// An error reply to `request`, for handlers: `Reply.failure(.notFound, "no model 0x…", to: request)`.
    public static func failure(_ error: WireError, _ message: String, to request: Request) -> Reply {
        .error(opcode: request.opcode.rawValue, ErrorReply(error, message: message))
    }
}
