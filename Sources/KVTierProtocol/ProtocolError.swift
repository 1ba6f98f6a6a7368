/// Why bytes from the peer, or a message about to be sent, do not fit the protocol. Each maps to
/// a stable wire code (`wireError`); `message` says what was wrong and how to fix it.
public enum ProtocolError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The frame or body does not parse: truncated, trailing bytes, bad UTF-8, an unknown
    /// element type, a misaligned extent, a field with a value the spec does not allow.
    case malformed(String)
    /// `what` is `size` (bytes or entries) but the protocol allows at most `limit`.
    case tooLarge(what: String, size: UInt64, limit: UInt64)
    /// The opcode is not one of docs/protocol.md's.
    case unknownOpcode(UInt16)
    /// The frame header sets flag bits the protocol does not define.
    case unsupportedFlags(UInt16)

    /// The error code a reply carries for this error.
    public var wireError: WireError {
        switch self {
        case .malformed, .unsupportedFlags: .malformed
        case .tooLarge: .tooLarge
        case .unknownOpcode: .unknownOpcode
        }
    }

    /// Whether the connection must be closed after the error reply: the stream can no longer be
    /// trusted after every error except an unknown opcode (whose frame was still delimited).
    public var closesConnection: Bool {
        if case .unknownOpcode = self { return false }
        return true
    }

    /// The text of the error reply: what went wrong and what to do.
    public var message: String {
        switch self {
        case .malformed(let detail):
            "malformed: \(detail); encode the body exactly as docs/protocol.md lists its fields"
        case .tooLarge(let what, let size, let limit):
            "\(what) is \(size) but the limit is \(limit); split the request or send less"
        case .unknownOpcode(let opcode):
            "unknown opcode 0x\(String(opcode, radix: 16)); check the protocol version agreed in HELLO"
        case .unsupportedFlags(let flags):
            "frame flags 0x\(String(flags, radix: 16)) set bits other than reply (0x1) and file descriptors (0x2); clear them"
        }
    }

    public var description: String { "\(wireError) (\(wireError.rawValue)): \(message)" }
}
