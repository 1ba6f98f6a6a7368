import KVTierProtocol

/// The transport's settings, each with the daemon's default.
public struct ServerConfiguration: Sendable {
    /// Connections served at once (default 1024). One more is answered with a `tooLarge` error
    /// reply (request id 0, opcode `HELLO`, since nothing was read from it) and closed at once:
    /// a client sees it as the reply to its `HELLO` and may retry later.
    public var maxConnections: Int = 1024
    /// Connections one uid may hold at once (default 64), so that one local user cannot take
    /// every slot of `maxConnections`. One more is refused like a connection over
    /// `maxConnections`, with a message naming this limit.
    public var maxConnectionsPerUID: Int = 64
    /// Longest a frame may take from its first byte to its last, and a reply to be written
    /// (default `ProtocolLimits.frameTimeout`, 10 s).
    public var frameTimeout: Duration = ProtocolLimits.frameTimeout
    /// Longest a connection may stay open before its `HELLO` is answered (default 10 s); then
    /// it gets a `timeout` error reply and is closed.
    public var handshakeTimeout: Duration = .seconds(10)
    /// Longest a connection may stay idle between frames once `HELLO` was answered (default
    /// 10 minutes); then it is closed without a reply (clients see the end of the stream and
    /// reconnect). Time spent waiting for a reply does not count.
    public var idleTimeout: Duration = .seconds(600)
    /// Most bytes of frames being assembled over all connections (default 512 MiB). A frame
    /// larger than `receiveBufferBytes` reserves its whole size before its body is read; one
    /// that does not fit waits unread, and is cut with a `timeout` error reply when
    /// `frameTimeout` passes first. At least `maxInlineBody` + 16.
    public var maxBufferedFrameBytes: Int = 512 << 20
    /// Of `maxBufferedFrameBytes`, the most the connections of one uid may hold (default
    /// 128 MiB: two whole inline frames). At least `maxInlineBody` + 16.
    public var maxBufferedFrameBytesPerUID: Int = 128 << 20
    /// How long `shutdown` lets requests in progress finish before their connections are shut
    /// down and their handler tasks cancelled (default 5 s).
    public var shutdownGracePeriod: Duration = .seconds(5)
    /// Largest control-frame body accepted, reported in `HELLO` (default
    /// `ProtocolLimits.maxControlBody`, 2 MiB; lower it only for tests).
    public var maxControlBody: Int = ProtocolLimits.maxControlBody
    /// Largest `PUT` request body accepted, reported in `HELLO` (default
    /// `ProtocolLimits.maxInlineBody`, 64 MiB).
    public var maxInlineBody: Int = ProtocolLimits.maxInlineBody
    /// Bytes read from a socket per call (default 64 KiB).
    public var receiveBufferBytes: Int = 64 << 10

    public init() {}
}
