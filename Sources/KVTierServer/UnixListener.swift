@preconcurrency import Glibc
import KVTierSystem
import Synchronization
import SystemPackage

/// The daemon's listening Unix stream socket: close-on-exec and non-blocking (the accept loop
/// waits in poll). Either bound here to a path, or adopted from a descriptor that is already
/// listening (systemd socket activation), in which case the socket file is not ours to remove.
public final class UnixListener: Sendable {
    /// Mode of the socket file: any local user may connect, since tenants are told apart by the
    /// uid the kernel reports for each connection, never by who could open the socket.
    public static let defaultMode: mode_t = 0o666
    /// Pending connections the kernel queues before `connect` blocks (SOMAXCONN caps it).
    public static let defaultBacklog: Int32 = 128
    /// Mode of parent directories created for the socket path.
    public static let parentDirectoryMode: mode_t = 0o755

    /// The listening socket; valid until `close()`.
    public let descriptor: Int32
    /// The socket file this listener created and removes on close; nil for an adopted socket.
    public let path: String?
    /// Device and inode of the socket file we bound, so `close` never removes a file that a
    /// later daemon bound at the same path.
    private let boundFile: (device: UInt64, inode: UInt64)?
    private let closed = Atomic<Bool>(false)

    /// Binds and listens on `path`, creating missing parent directories (0755). A socket file
    /// left by a daemon that died is replaced; a live one makes this throw `addressInUse`, and a
    /// file that is not a socket is never touched (`pathNotASocket`).
    public init(path: String, mode: mode_t = UnixListener.defaultMode, backlog: Int32 = UnixListener.defaultBacklog) throws(ServerError) {
        let address: UnixSocketAddress
        do { address = try UnixSocketAddress(path) } catch where error == .fileNameTooLong { throw .pathTooLong(path: path) } catch {
            throw .system(operation: "socket path \(path)", error)
        }
        try Self.makeParentDirectories(of: path)
        let descriptor: FileDescriptor
        do { descriptor = try FileDescriptor.unixSocket(nonBlocking: true) } catch { throw .system(operation: "socket", error) }
        var bound = false
        do throws(ServerError) {
            try Self.bindReplacingStale(descriptor, address: address)
            bound = true
            do { try FileSystem.changeMode(path, mode) } catch { throw .system(operation: "chmod \(path)", error) }
            do { try descriptor.listen(backlog: backlog) } catch { throw .system(operation: "listen \(path)", error) }
            let status: stat?
            do { status = try FileSystem.linkStatus(path) } catch { throw .system(operation: "lstat \(path)", error) }
            boundFile = status.map { (UInt64($0.st_dev), UInt64($0.st_ino)) }
        } catch {
            descriptor.closeIgnoringErrors()
            if bound { try? FileSystem.unlink(path) }  // Our own half-made socket file.
            throw error
        }
        self.descriptor = descriptor.rawValue
        self.path = path
    }

    /// Takes over `descriptor`, which must already be a listening Unix stream socket (from
    /// systemd, `LISTEN_FDS`). It is made close-on-exec and non-blocking, and closed by `close()`;
    /// its socket file belongs to whoever bound it and is left in place.
    public init(adopting descriptor: Int32) throws(ServerError) {
        let socket = FileDescriptor(rawValue: descriptor)
        do {
            guard try socket.socketOption(SO_ACCEPTCONN) == 1,
                  try socket.socketOption(SO_TYPE) == FileDescriptor.streamSocketType,
                  try socket.socketOption(FileDescriptor.socketDomainOption) == AF_UNIX
            else { throw ServerError.notAListeningSocket(descriptor: descriptor) }
        } catch let error as ServerError {
            throw error
        } catch {
            throw .notAListeningSocket(descriptor: descriptor)
        }
        do {
            try socket.setCloseOnExec()
            try socket.addStatusFlags(O_NONBLOCK)
        } catch {
            throw .system(operation: "fcntl on adopted descriptor \(descriptor)", error)
        }
        self.descriptor = descriptor
        self.path = nil
        self.boundFile = nil
    }

    /// Closes the socket and removes its file if this listener created it and it is still the
    /// same file. Idempotent. Call only once nothing polls `descriptor` any more.
    public func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        FileDescriptor(rawValue: descriptor).closeIgnoringErrors()
        guard let path, let boundFile, let status = try? FileSystem.linkStatus(path),
              UInt64(status.st_dev) == boundFile.device, UInt64(status.st_ino) == boundFile.inode
        else { return }
        try? FileSystem.unlink(path)
    }

    deinit { close() }

    /// mkdir -p of the directories above `path`, each 0755 when created.
    private static func makeParentDirectories(of path: String) throws(ServerError) {
        let components = path.split(separator: "/", omittingEmptySubsequences: false).dropLast()
        var prefix = ""
        for (index, component) in components.enumerated() {
            prefix += (index == 0 ? "" : "/") + component
            guard !component.isEmpty, component != ".", component != ".." else { continue }
            do { try FileSystem.makeDirectory(prefix, mode: parentDirectoryMode) } catch {
                throw .system(operation: "mkdir \(prefix)", error)
            }
        }
    }

    /// bind; on EADDRINUSE probes the existing file and removes it only when it is a socket
    /// nobody accepts on (a crashed daemon's leftover).
    private static func bindReplacingStale(_ descriptor: FileDescriptor, address: UnixSocketAddress) throws(ServerError) {
        let path = address.description
        for _ in 0..<3 {
            do {
                try descriptor.bind(to: address)
                return
            } catch where error == .addressInUse {
                // Fall through to the probe.
            } catch {
                throw .system(operation: "bind \(path)", error)
            }
            let existing: stat?
            do { existing = try FileSystem.linkStatus(path) } catch { throw .system(operation: "lstat \(path)", error) }
            guard let existing else { continue }  // Removed meanwhile: bind again.
            guard existing.st_mode & S_IFMT == S_IFSOCK else { throw .pathNotASocket(path: path) }
            guard try !isAcceptingConnections(address) else { throw .addressInUse(path: path) }
            do { try FileSystem.unlink(path) } catch where error == .noSuchFileOrDirectory {} catch {
                throw .system(operation: "unlink stale socket \(path)", error)
            }
        }
        throw .addressInUse(path: path)
    }

    /// Whether something listens on `path`: a connect that succeeds, or finds the backlog full,
    /// means yes; ECONNREFUSED (no listener) or ENOENT mean no; anything else is reported rather
    /// than guessed, so a live socket is never removed.
    private static func isAcceptingConnections(_ address: UnixSocketAddress) throws(ServerError) -> Bool {
        let path = address.description
        let probe: FileDescriptor
        do { probe = try FileDescriptor.unixSocket(nonBlocking: true) } catch { throw .system(operation: "socket", error) }
        defer { probe.closeIgnoringErrors() }
        do {
            try probe.connect(to: address)
            return true
        } catch where error == .resourceTemporarilyUnavailable {
            return true
        } catch where error == .connectionRefused || error == .noSuchFileOrDirectory {
            return false
        } catch {
            throw .system(operation: "connect probe \(path)", error)
        }
    }
}
