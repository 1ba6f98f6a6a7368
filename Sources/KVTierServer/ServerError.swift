import KVTierSystem
import SystemPackage

/// Why the server could not start or keep serving. Each case says what to do about it; the
/// failing system call's `Errno` is kept as the cause.
public enum ServerError: Error, Sendable, Equatable, CustomStringConvertible {
    /// Another process (likely another kvtierd) accepts connections on `path`.
    case addressInUse(path: String)
    /// Something other than a socket is at `path`; it is never removed.
    case pathNotASocket(path: String)
    /// `path` does not fit a Unix socket address (107 bytes).
    case pathTooLong(path: String)
    /// The descriptor handed over (socket activation) is not a listening Unix stream socket.
    case notAListeningSocket(descriptor: Int32)
    /// A system call failed: `operation` names it and what it acted on.
    case system(operation: String, Errno)

    public var description: String {
        switch self {
        case .addressInUse(let path):
            "another process is listening on \(path); stop the other kvtierd or configure a different socket path"
        case .pathNotASocket(let path):
            "\(path) exists and is not a socket; remove it or configure a different socket path"
        case .pathTooLong(let path):
            "socket path \(path) is \(path.utf8.count) bytes but a Unix socket path holds at most \(UnixSocketAddress.maxPathBytes); choose a shorter one"
        case .notAListeningSocket(let descriptor):
            "descriptor \(descriptor) is not a listening Unix stream socket; check the systemd socket unit (ListenStream= with a path)"
        case .system(let operation, let errno):
            "\(operation) failed: \(errno) (errno \(errno.rawValue))"
        }
    }
}
