@preconcurrency import Glibc
import SystemPackage

/// Where a stream connection goes: a TCP host and port, or a Unix socket path. The remote tier's
/// Redis connections are made with `FileDescriptor.connectStream(to:timeoutMillis:)`; the
/// result is non-blocking, so every later wait is a `Poll.wait` with the caller's deadline.
public enum StreamEndpoint: Sendable, Equatable, CustomStringConvertible {
    case tcp(host: String, port: UInt16)
    case unix(path: String)

    public var description: String {
        switch self {
        case .tcp(let host, let port): host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case .unix(let path): path
        }
    }
}

/// Why a host name gave no address (getaddrinfo's error, which is not an errno).
public struct AddressResolutionError: Error, Sendable, CustomStringConvertible {
    public var host: String
    public var reason: String
    public var description: String { "cannot resolve '\(host)': \(reason)" }
}

/// A resolved socket address (`sockaddr_in` or `sockaddr_in6`), held by value.
public struct InternetSocketAddress: Sendable {
    public let family: Int32
    private let storage: sockaddr_storage
    private let length: socklen_t

    /// The addresses `host` (a name or a numeric IPv4/IPv6 address) resolves to for TCP on
    /// `port`, in getaddrinfo's order. getaddrinfo blocks while it asks the resolver: call it off
    /// the cooperative pool.
    public static func resolve(host: String, port: UInt16) throws(AddressResolutionError) -> [InternetSocketAddress] {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_NUMERICSERV | AI_ADDRCONFIG
        var list: UnsafeMutablePointer<addrinfo>?
        let status = getaddrinfo(host, "\(port)", &hints, &list)
        guard status == 0 else {
            throw AddressResolutionError(host: host, reason: String(cString: gai_strerror(status)))
        }
        defer { freeaddrinfo(list) }
        var found: [InternetSocketAddress] = []
        var entry = list
        while let current = entry {
            let info = current.pointee
            if let address = info.ai_addr, info.ai_family == AF_INET || info.ai_family == AF_INET6,
               Int(info.ai_addrlen) <= MemoryLayout<sockaddr_storage>.size {
                var storage = sockaddr_storage()
                withUnsafeMutableBytes(of: &storage) { raw in
                    raw.copyMemory(from: UnsafeRawBufferPointer(start: address, count: Int(info.ai_addrlen)))
                }
                found.append(InternetSocketAddress(family: info.ai_family, storage: storage, length: info.ai_addrlen))
            }
            entry = info.ai_next
        }
        guard !found.isEmpty else { throw AddressResolutionError(host: host, reason: "no IPv4 or IPv6 address") }
        return found
    }

    /// Lends the address as the kernel takes it.
    public func withSocketAddress<R, E: Error>(_ body: (UnsafePointer<sockaddr>, socklen_t) throws(E) -> R) throws(E) -> R {
        var storage = self.storage
        return try withUnsafePointer(to: &storage) { (pointer) throws(E) -> R in
            try pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { (raw) throws(E) -> R in try body(raw, length) }
        }
    }
}

extension FileDescriptor {
    /// A connected, non-blocking, close-on-exec stream socket to `endpoint`, within
    /// `timeoutMillis` (name resolution excepted: getaddrinfo has no timeout). TCP sockets get
    /// TCP_NODELAY, since requests are written whole and a delayed segment would cost a round
    /// trip. Tries each address a host resolves to until one connects.
    /// - Throws: `Errno` of the last attempt (`.timedOut` when the time ran out), or
    ///   `AddressResolutionError` as `StreamConnectError.resolution`.
    public static func connectStream(to endpoint: StreamEndpoint, timeoutMillis: Int) throws(StreamConnectError) -> FileDescriptor {
        let deadline = Deadline(millisFromNow: timeoutMillis)
        switch endpoint {
        case .unix(let path):
            let address: UnixSocketAddress
            do { address = try UnixSocketAddress(path) } catch { throw .system(error) }
            let socket: FileDescriptor
            do { socket = try unixSocket(.stream, nonBlocking: true) } catch { throw .system(error) }
            do {
                try socket.connect(to: address)
                return socket
            } catch {
                socket.closeIgnoringErrors()
                throw .system(error)
            }
        case .tcp(let host, let port):
            let addresses: [InternetSocketAddress]
            do { addresses = try InternetSocketAddress.resolve(host: host, port: port) } catch { throw .resolution(error) }
            var last = Errno.timedOut
            for address in addresses {
                guard !deadline.passed else { break }
                do { return try connectTCP(address, deadline) } catch { last = error }
            }
            throw .system(last)
        }
    }

    private static func connectTCP(_ address: InternetSocketAddress, _ deadline: Deadline) throws(Errno) -> FileDescriptor {
        let type = Int32(SOCK_STREAM.rawValue) | closeOnExecSocketFlag | nonBlockingSocketFlag
        let family = address.family
        let socket = FileDescriptor(rawValue: try SystemCall.retryingInterrupts { Glibc.socket(family, type, 0) })
        do throws(Errno) {
            let descriptor = socket.rawValue
            let result = address.withSocketAddress { pointer, length in Glibc.connect(descriptor, pointer, length) }
            if result != 0 {
                // Non-blocking: the handshake goes on in the kernel (EINTR too); wait for it.
                guard errno == EINPROGRESS || errno == EINTR else { throw Errno(rawValue: errno) }
                var waiting = [pollfd(socket, events: Int16(POLLOUT))]
                while try Poll.wait(&waiting, timeoutMillis: deadline.remainingMillis) == 0 {
                    if deadline.passed { throw Errno.timedOut }
                }
                let pending = try socket.socketOption(SO_ERROR)
                if pending != 0 { throw Errno(rawValue: pending) }
            }
            var on: Int32 = 1
            _ = try SystemCall.retryingInterrupts {
                setsockopt(descriptor, Int32(IPPROTO_TCP), TCP_NODELAY, &on, socklen_t(MemoryLayout<Int32>.size))
            }
            return socket
        } catch {
            socket.closeIgnoringErrors()
            throw error
        }
    }

    /// One sendmsg(MSG_NOSIGNAL | MSG_DONTWAIT) of `parts` gathered in order (no copy into one
    /// buffer); returns the bytes sent, possibly fewer than given. EAGAIN is thrown when the
    /// socket has no room. At most `maxGatheredParts` parts are offered per call.
    public func sendGathered(_ parts: ArraySlice<UnsafeRawBufferPointer>) throws(Errno) -> Int {
        let socket = rawValue
        var vectors = parts.prefix(Self.maxGatheredParts).map {
            iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count)
        }
        return try vectors.withUnsafeMutableBufferPointer { (v) throws(Errno) -> Int in
            var message = msghdr()
            message.msg_iov = v.baseAddress
            message.msg_iovlen = v.count
            return try SystemCall.retryingInterrupts { sendmsg(socket, &message, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT)) }
        }
    }

    /// IOV_MAX on Linux.
    public static let maxGatheredParts = 1024
}

/// Why `connectStream` failed.
public enum StreamConnectError: Error, Sendable, CustomStringConvertible {
    case system(Errno)
    case resolution(AddressResolutionError)

    public var description: String {
        switch self {
        case .system(let errno): "\(errno)"
        case .resolution(let error): error.description
        }
    }
}

/// A point in monotonic time that waits count down to.
public struct Deadline: Sendable {
    public let nanoseconds: UInt64

    public init(millisFromNow millis: Int) {
        nanoseconds = Self.now() &+ UInt64(max(0, millis)) &* 1_000_000
    }

    /// A deadline that never passes (benchmarks that time their own runs).
    public static let never = Deadline(nanoseconds: .max)

    init(nanoseconds: UInt64) { self.nanoseconds = nanoseconds }

    public var passed: Bool { Self.now() >= nanoseconds }

    /// Milliseconds left for poll, rounded up (0 once passed).
    public var remainingMillis: Int32 {
        let now = Self.now()
        guard nanoseconds > now else { return 0 }
        return Int32(clamping: (nanoseconds - now + 999_999) / 1_000_000)
    }

    static func now() -> UInt64 {
        var time = timespec()
        clock_gettime(CLOCK_MONOTONIC, &time)
        return UInt64(time.tv_sec) &* 1_000_000_000 &+ UInt64(time.tv_nsec)
    }
}
