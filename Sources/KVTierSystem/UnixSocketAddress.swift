@preconcurrency import Glibc
import SystemPackage

/// The `sockaddr_un` of a Unix socket: a file system path, or a name in Linux's abstract
/// namespace (no file; systemd's `NOTIFY_SOCKET` writes one as `@name`).
public struct UnixSocketAddress: Sendable, CustomStringConvertible {
    /// `sun_path` holds 108 bytes; a path needs one of them for its terminating NUL.
    public static let maxPathBytes = 107

    /// The path, or `@name` for an abstract name.
    public let description: String
    private let address: sockaddr_un
    private let length: socklen_t

    /// The socket at `path`.
    /// - Throws: `Errno.fileNameTooLong` when `path` does not fit `sun_path` (the kernel would
    ///   silently cut it), `Errno.invalidArgument` when it is empty or holds a NUL.
    public init(_ path: String) throws(Errno) {
        try self.init(bytes: Array(path.utf8), abstract: false, description: path)
    }

    /// The socket named `name` in the abstract namespace. It has no terminating NUL, so it may
    /// be one byte longer than a path.
    public static func abstract(_ name: String) throws(Errno) -> UnixSocketAddress {
        try UnixSocketAddress(bytes: Array(name.utf8), abstract: true, description: "@" + name)
    }

    private init(bytes: [UInt8], abstract: Bool, description: String) throws(Errno) {
        guard !bytes.isEmpty, !bytes.contains(0) else { throw .invalidArgument }
        guard bytes.count <= Self.maxPathBytes else { throw .fileNameTooLong }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            if abstract {
                raw[0] = 0
                UnsafeMutableRawBufferPointer(rebasing: raw[1...]).copyBytes(from: bytes)
            } else {
                raw.copyBytes(from: bytes)
                raw[bytes.count] = 0
            }
        }
        self.address = address
        // An abstract name is exactly as long as the length says; a path is NUL-terminated.
        self.length = abstract
            ? socklen_t(MemoryLayout<sa_family_t>.size + 1 + bytes.count)
            : socklen_t(MemoryLayout<sockaddr_un>.size)
        self.description = description
    }

    /// Lends the address as the kernel takes it.
    public func withSocketAddress<R, E: Error>(_ body: (UnsafePointer<sockaddr>, socklen_t) throws(E) -> R) throws(E) -> R {
        var address = self.address
        return try withUnsafePointer(to: &address) { (pointer) throws(E) -> R in
            try pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { (raw) throws(E) -> R in try body(raw, length) }
        }
    }
}
