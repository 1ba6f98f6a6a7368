@preconcurrency import Glibc
import SystemPackage

/// Unix sockets: creating, binding, listening, accepting, connecting, options and peer
/// credentials. Every socket made here is close-on-exec. Sending and receiving, with descriptors
/// passed as SCM_RIGHTS, are in `SocketMessages.swift`.
extension FileDescriptor {
    /// The kind of a socket.
    public enum SocketKind: Sendable {
        case stream, datagram

        var rawValue: Int32 {
            switch self {
            case .stream: return Int32(SOCK_STREAM.rawValue)
            case .datagram: return Int32(SOCK_DGRAM.rawValue)
            }
        }
    }

    static let closeOnExecSocketFlag = Int32(SOCK_CLOEXEC.rawValue)
    static let nonBlockingSocketFlag = Int32(SOCK_NONBLOCK.rawValue)
    /// SO_DOMAIN, missing from Swift's Glibc module.
    public static let socketDomainOption: Int32 = 39
    /// SOCK_STREAM as `socketOption(SO_TYPE)` reports it.
    public static let streamSocketType = Int32(SOCK_STREAM.rawValue)

    /// socket(AF_UNIX, kind | SOCK_CLOEXEC [| SOCK_NONBLOCK]).
    public static func unixSocket(_ kind: SocketKind = .stream, nonBlocking: Bool = false) throws(Errno) -> FileDescriptor {
        let type = kind.rawValue | closeOnExecSocketFlag | (nonBlocking ? nonBlockingSocketFlag : 0)
        return FileDescriptor(rawValue: try SystemCall.retryingInterrupts { socket(AF_UNIX, type, 0) })
    }

    /// socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC): two connected ends.
    public static func unixSocketPair(_ kind: SocketKind = .stream) throws(Errno) -> (FileDescriptor, FileDescriptor) {
        var ends: [Int32] = [-1, -1]
        _ = try SystemCall.retryingInterrupts { socketpair(AF_UNIX, kind.rawValue | closeOnExecSocketFlag, 0, &ends) }
        return (FileDescriptor(rawValue: ends[0]), FileDescriptor(rawValue: ends[1]))
    }

    /// bind(2); the socket file is created at the address's path.
    public func bind(to address: UnixSocketAddress) throws(Errno) {
        let descriptor = rawValue
        _ = try address.withSocketAddress { (pointer, length) throws(Errno) in
            try SystemCall.retryingInterrupts { Glibc.bind(descriptor, pointer, length) }
        }
    }

    public func listen(backlog: Int32) throws(Errno) {
        let descriptor = rawValue
        _ = try SystemCall.retryingInterrupts { Glibc.listen(descriptor, backlog) }
    }

    private typealias Accept4 = @convention(c) (Int32, UnsafeMutablePointer<sockaddr>?, UnsafeMutablePointer<socklen_t>?, Int32) -> Int32

    /// accept4(SOCK_CLOEXEC [| SOCK_NONBLOCK]) on a listening socket of any family. Non-blocking
    /// by default: the connection is then waited on with poll, never in a blocking call. EAGAIN is
    /// thrown when nobody is waiting on a non-blocking listener.
    public func acceptConnection(nonBlocking: Bool = true) throws(Errno) -> FileDescriptor {
        guard let accept4 = SystemCall.libcFunction("accept4", as: Accept4.self) else { throw .noFunction }
        let descriptor = rawValue
        let flags = Self.closeOnExecSocketFlag | (nonBlocking ? Self.nonBlockingSocketFlag : 0)
        return FileDescriptor(rawValue: try SystemCall.retryingInterrupts { accept4(descriptor, nil, nil, flags) })
    }

    /// connect(2). An interrupted connect goes on in the kernel (connecting again would fail with
    /// EALREADY), so after EINTR this waits for writability and reports the socket's pending error.
    /// A non-blocking socket whose listener's backlog is full throws EAGAIN.
    public func connect(to address: UnixSocketAddress) throws(Errno) {
        let descriptor = rawValue
        let result = address.withSocketAddress { pointer, length in Glibc.connect(descriptor, pointer, length) }
        guard result != 0 else { return }
        guard errno == EINTR else { throw Errno(rawValue: errno) }
        var waiting = [pollfd(self, events: Int16(POLLOUT))]
        while try Poll.wait(&waiting, timeoutMillis: -1) == 0 {}
        let pending = try socketOption(SO_ERROR)
        if pending != 0 { throw Errno(rawValue: pending) }
    }

    /// getsockopt(SOL_SOCKET, option) of an integer option (SO_TYPE, SO_ACCEPTCONN, SO_ERROR, …).
    public func socketOption(_ option: Int32) throws(Errno) -> Int32 {
        let descriptor = rawValue
        var value: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        _ = try SystemCall.retryingInterrupts { getsockopt(descriptor, SOL_SOCKET, option, &value, &length) }
        return value
    }

    /// setsockopt(SOL_SOCKET, option) of an integer option (SO_REUSEADDR, …).
    public func setSocketOption(_ option: Int32, to value: Int32) throws(Errno) {
        let descriptor = rawValue
        var value = value
        _ = try SystemCall.retryingInterrupts { setsockopt(descriptor, SOL_SOCKET, option, &value, socklen_t(MemoryLayout<Int32>.size)) }
    }

    /// Makes a blocking receive (SO_RCVTIMEO) or send (SO_SNDTIMEO) give up with EAGAIN after
    /// `micros` without progress; 0: never.
    public func setTimeout(_ direction: TimeoutDirection, micros: Int) throws(Errno) {
        let descriptor = rawValue
        var value = timeval(tv_sec: micros / 1_000_000, tv_usec: micros % 1_000_000)
        let option = direction == .receive ? SO_RCVTIMEO : SO_SNDTIMEO
        _ = try SystemCall.retryingInterrupts { setsockopt(descriptor, SOL_SOCKET, option, &value, socklen_t(MemoryLayout<timeval>.size)) }
    }

    public enum TimeoutDirection: Sendable { case receive, send }

    /// Who is on the other end of a connected Unix socket, as the kernel recorded it at connect
    /// time (SO_PEERCRED, `struct ucred { pid_t pid; uid_t uid; gid_t gid; }`): the peer cannot
    /// forge it.
    public func peerCredentials() throws(Errno) -> (pid: Int32, uid: UInt32, gid: UInt32) {
        let descriptor = rawValue
        var fields: (Int32, UInt32, UInt32) = (0, 0, 0)
        var length = socklen_t(MemoryLayout.size(ofValue: fields))
        _ = try SystemCall.retryingInterrupts { getsockopt(descriptor, SOL_SOCKET, SO_PEERCRED, &fields, &length) }
        guard length == MemoryLayout.size(ofValue: fields) else { throw .invalidArgument }
        return fields
    }

    /// What `shutdown` stops.
    public enum ShutdownDirection: Sendable {
        case receive, send, both

        var rawValue: Int32 {
            switch self {
            case .receive: return Int32(SHUT_RD)
            case .send: return Int32(SHUT_WR)
            case .both: return Int32(SHUT_RDWR)
            }
        }
    }

    /// shutdown(2): wakes a thread polling, receiving or sending on the socket (it sees end of
    /// stream or EPIPE); the descriptor stays open. Best effort: a socket already shut down or
    /// reset has nothing left to stop.
    public func shutdown(_ direction: ShutdownDirection = .both) {
        _ = Glibc.shutdown(rawValue, direction.rawValue)
    }
}
