import KVTierProtocol

/// The transport's settings, each with the daemon's default.
public struct ServerConfiguration: Sendable {
    /// Connections served at once (default 1024). One more is answered with a `tooLarge` error
    /// reply (request id 0, opcode `HELLO`, since nothing was read from it) and closed at once:
    /// a client sees it as the reply to its `HELLO` and may retry later.
    public var maxConnections: Int = 1024
    /// Longest a frame may take from its first byte to its last, and a reply to be written
    /// (default `ProtocolLimits.frameTimeout`, 10 s). A connection idle between frames may stay
    /// open indefinitely.
    public var frameTimeout: Duration = ProtocolLimits.frameTimeout
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
