import KVTierCore

/// The error codes a reply's `status` carries (docs/protocol.md, "Error codes"). The numbers are
/// stable: never renumber, only add.
public enum WireError: UInt32, Error, Sendable, CaseIterable, CustomStringConvertible {
    case malformed = 1
    case unsupportedVersion = 2
    case tooLarge = 3
    case unknownOpcode = 4
    case notFound = 5
    case permissionDenied = 6
    case overBudget = 7
    case invalidArgument = 8
    case outOfOrder = 9
    case `internal` = 10
    case unavailable = 11
    case timeout = 12

    /// The spec's name of the code.
    public var name: String {
        switch self {
        case .malformed: "malformed"
        case .unsupportedVersion: "unsupportedVersion"
        case .tooLarge: "tooLarge"
        case .unknownOpcode: "unknownOpcode"
        case .notFound: "notFound"
        case .permissionDenied: "permissionDenied"
        case .overBudget: "overBudget"
        case .invalidArgument: "invalidArgument"
        case .outOfOrder: "outOfOrder"
        case .internal: "internal"
        case .unavailable: "unavailable"
        case .timeout: "timeout"
        }
    }

    /// What the code means, as docs/protocol.md says.
    public var meaning: String {
        switch self {
        case .malformed: "the frame or body does not parse"
        case .unsupportedVersion: "no common protocol version"
        case .tooLarge: "over a limit"
        case .unknownOpcode: "the opcode is not one this daemon knows"
        case .notFound: "no such model, session, lease or cached prefix"
        case .permissionDenied: "the object belongs to another tenant"
        case .overBudget: "the RAM tier cannot hold this even after eviction"
        case .invalidArgument: "well-formed but inconsistent (shape mismatch, token range)"
        case .outOfOrder: "a request before HELLO, or HELLO twice"
        case .internal: "a bug in the daemon; the message says where"
        case .unavailable: "the disk tier is failing; memory tiers still serve"
        case .timeout: "a frame took longer than frameTimeout"
        }
    }

    public var description: String { name }
}

/// The body of a reply whose `status` is not 0: `string message`. The code travels in the
/// header; `status` keeps it raw so a client can report codes newer than this build.
public struct ErrorReply: Sendable, Equatable {
    public var status: UInt32
    public var message: String

    public init(_ error: WireError, message: String) {
        self.init(status: error.rawValue, message: message)
    }

    public init(status: UInt32, message: String) {
        precondition(status != 0, "status 0 means success; an error reply needs a code")
        self.status = status
        self.message = Self.truncated(message)
    }

    /// `message` cut to `maxStringBytes` at a character boundary: a diagnostic may lose its
    /// tail, but an error reply must never fail to encode.
    static func truncated(_ message: String) -> String {
        guard message.utf8.count > ProtocolLimits.maxStringBytes else { return message }
        var result = ""
        var bytes = 0
        for character in message {
            let width = character.utf8.count
            if bytes + width > ProtocolLimits.maxStringBytes { break }
            result.append(character)
            bytes += width
        }
        return result
    }

    /// The reply for a `ProtocolError` found while reading the peer's frame.
    public init(_ error: ProtocolError) {
        self.init(error.wireError, message: error.message)
    }

    /// The code, when this build knows it.
    public var error: WireError? { WireError(rawValue: status) }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        try writer.wireString(message, field: "error message")
    }

    public init(status: UInt32, decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        guard status != 0 else { throw .malformed("an error reply needs a non-zero status") }
        var reader = BodyReader(body, context: "error reply")
        self.status = status
        message = try reader.string("message")
        try reader.finish()
    }

    public init(status: UInt32, decoding body: [UInt8]) throws(ProtocolError) {
        self = try withRawBytes(body) { (raw) throws(ProtocolError) -> ErrorReply in try ErrorReply(status: status, decoding: raw) }
    }
}
