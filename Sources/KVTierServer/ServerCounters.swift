import KVTierProtocol
import Synchronization

/// The transport's counters and gauges, created once with the server and shared with whoever
/// answers `STATUS` (the store merges them with its own).
public final class ServerCounters: Sendable {
    let connectionsAccepted = Atomic<UInt64>(0)
    let connectionsRejected = Atomic<UInt64>(0)
    /// Of `connectionsRejected`, those over `maxConnectionsPerUID`.
    let connectionsRejectedPerUID = Atomic<UInt64>(0)
    let connectionsOpen = Atomic<UInt64>(0)
    /// Connections closed for sending no `HELLO` within `handshakeTimeout`, or nothing within
    /// `idleTimeout`.
    let handshakeTimeouts = Atomic<UInt64>(0)
    let idleTimeouts = Atomic<UInt64>(0)
    let framesReceived = Atomic<UInt64>(0)
    let protocolErrors = Atomic<UInt64>(0)
    let frameTimeouts = Atomic<UInt64>(0)
    let handlerReplies = Atomic<UInt64>(0)
    /// Of `handlerReplies`, those answered on the connection thread (`Handling.reply`).
    let immediateReplies = Atomic<UInt64>(0)

    public init() {}

    /// Every counter, under the names `STATUS` reports.
    public func snapshot() -> [StatusCounter] {
        [
            StatusCounter(name: "server.connections.accepted", value: connectionsAccepted.load(ordering: .relaxed)),
            StatusCounter(name: "server.connections.rejected", value: connectionsRejected.load(ordering: .relaxed)),
            StatusCounter(name: "server.connections.rejected_per_uid", value: connectionsRejectedPerUID.load(ordering: .relaxed)),
            StatusCounter(name: "server.connections.open", value: connectionsOpen.load(ordering: .relaxed)),
            StatusCounter(name: "server.connections.handshake_timeouts", value: handshakeTimeouts.load(ordering: .relaxed)),
            StatusCounter(name: "server.connections.idle_timeouts", value: idleTimeouts.load(ordering: .relaxed)),
            StatusCounter(name: "server.frames.received", value: framesReceived.load(ordering: .relaxed)),
            StatusCounter(name: "server.errors.protocol", value: protocolErrors.load(ordering: .relaxed)),
            StatusCounter(name: "server.errors.frame_timeout", value: frameTimeouts.load(ordering: .relaxed)),
            StatusCounter(name: "server.requests.handled", value: handlerReplies.load(ordering: .relaxed)),
            StatusCounter(name: "server.requests.immediate", value: immediateReplies.load(ordering: .relaxed)),
        ]
    }

    /// One counter by its `STATUS` name.
    public func value(of name: String) -> UInt64? {
        snapshot().first { $0.name == name }?.value
    }

    static func increment(_ counter: borrowing Atomic<UInt64>) {
        counter.wrappingAdd(1, ordering: .relaxed)
    }
}
