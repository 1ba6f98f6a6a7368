@preconcurrency import Glibc
import SystemPackage

/// The client's end of the daemon's Unix stream socket: blocking calls, each wrapped once,
/// failures as `Errno`, EINTR retried. Used by one exchange at a time (the transport's gate).
struct ClientSocket: ~Copyable {
    private(set) var descriptor: Int32

    /// `sun_path` is 108 bytes including the terminating NUL.
    static let maxPathBytes = 107
    static let noSignal = Int32(MSG_NOSIGNAL)
    static let rightsType = Int32(SCM_RIGHTS)
    /// The most descriptors one message may bring: the protocol sends one, a bigger buffer lets
    /// us see (and close) any extra ones instead of having the kernel truncate silently.
    static let maxDescriptors = 4

    /// Connects to the socket at `path`; `ENAMETOOLONG` when it does not fit `sun_path`.
    init(connectingTo path: String) throws(Errno) {
        let bytes = Array(path.utf8)
        guard !bytes.isEmpty, !bytes.contains(0) else { throw .invalidArgument }
        guard bytes.count <= Self.maxPathBytes else { throw .fileNameTooLong }
        let descriptor = try Self.retrying { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        do throws(Errno) {
            try Self.connect(descriptor, pathBytes: bytes)
        } catch {
            _ = Glibc.close(descriptor)
            throw error
        }
        self.descriptor = descriptor
    }

    /// connect; an interrupted connect goes on in the kernel, so EINTR is followed by a wait for
    /// writability and the socket's pending error.
    private static func connect(_ descriptor: Int32, pathBytes: [UInt8]) throws(Errno) {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: pathBytes)
            raw[pathBytes.count] = 0
        }
        let result = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard result != 0 else { return }
        guard errno == EINTR else { throw Errno(rawValue: errno) }
        var waiting = pollfd(fd: descriptor, events: Int16(POLLOUT), revents: 0)
        while true {
            let ready = poll(&waiting, 1, -1)
            if ready > 0 { break }
            if ready < 0 && errno != EINTR { throw Errno(rawValue: errno) }
        }
        var pending: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        _ = try retrying { getsockopt(descriptor, SOL_SOCKET, SO_ERROR, &pending, &length) }
        if pending != 0 { throw Errno(rawValue: pending) }
    }

    /// Makes a blocking receive give up with `EAGAIN` after `micros` without data (0: never).
    func setReceiveTimeout(micros: Int) throws(Errno) {
        var value = timeval(tv_sec: micros / 1_000_000, tv_usec: micros % 1_000_000)
        _ = try Self.retrying { setsockopt(descriptor, SOL_SOCKET, SO_RCVTIMEO, &value, socklen_t(MemoryLayout<timeval>.size)) }
    }

    /// poll for readability (or end of stream, or an error a receive will report): true when
    /// ready, false after `timeoutMillis` (-1: never) or on EINTR, so the caller recomputes
    /// its deadline.
    func waitReadable(timeoutMillis: Int32) throws(Errno) -> Bool {
        var waiting = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
        let ready = poll(&waiting, 1, timeoutMillis)
        if ready > 0 { return true }
        if ready == 0 || errno == EINTR { return false }
        throw Errno(rawValue: errno)
    }

    /// Sends every byte (sendmsg with MSG_NOSIGNAL, so a closed daemon is `EPIPE`, not SIGPIPE).
    func sendAll(_ bytes: [UInt8]) throws(Errno) {
        let descriptor = self.descriptor
        let failure: Errno? = bytes.withUnsafeBytes { raw in
            var sent = 0
            while sent < raw.count {
                var vector = iovec(iov_base: UnsafeMutableRawPointer(mutating: raw.baseAddress! + sent), iov_len: raw.count - sent)
                let result = withUnsafeMutablePointer(to: &vector) { vectorPointer in
                    var message = msghdr()
                    message.msg_iov = vectorPointer
                    message.msg_iovlen = 1
                    return sendmsg(descriptor, &message, Self.noSignal)
                }
                if result >= 0 {
                    sent += result
                } else if errno != EINTR {
                    return Errno(rawValue: errno)
                }
            }
            return nil
        }
        if let failure { throw failure }
    }

    /// What one `recvmsg` brought.
    struct Received {
        var bytes: Int
        /// Descriptors that came with the bytes; the caller owns (and must close) them.
        var descriptors: [Int32]
        /// The kernel cut the control data (MSG_CTRUNC): descriptors were lost.
        var controlTruncated: Bool
        /// Control messages other than SCM_RIGHTS, or malformed ones.
        var unexpectedControl: Bool
    }

    /// One blocking recvmsg(MSG_CMSG_CLOEXEC) with room for descriptors in `control` (at least
    /// `controlSpace(maxDescriptors)` bytes, reused across calls); 0 bytes at end of stream.
    func receive(into buffer: UnsafeMutableRawBufferPointer, control: UnsafeMutableRawBufferPointer) throws(Errno) -> Received {
        precondition(control.count >= Self.controlSpace(Self.maxDescriptors))
        var vector = iovec(iov_base: buffer.baseAddress, iov_len: buffer.count)
        var message = msghdr()
        message.msg_control = control.baseAddress
        message.msg_controllen = control.count
        let count = try withUnsafeMutablePointer(to: &vector) { (vectorPointer) throws(Errno) -> Int in
            message.msg_iov = vectorPointer
            message.msg_iovlen = 1
            return try Self.retrying { recvmsg(descriptor, &message, Int32(MSG_CMSG_CLOEXEC)) }
        }
        var received = Received(bytes: count, descriptors: [], controlTruncated: message.msg_flags & Int32(MSG_CTRUNC) != 0,
                                unexpectedControl: false)
        var offset = 0
        let header = Self.controlHeaderBytes
        while offset + header <= message.msg_controllen {
            let entry = control.load(fromByteOffset: offset, as: cmsghdr.self)
            guard entry.cmsg_len >= header, offset + entry.cmsg_len <= message.msg_controllen else {
                received.unexpectedControl = true
                break
            }
            if entry.cmsg_level == SOL_SOCKET && entry.cmsg_type == Self.rightsType && (entry.cmsg_len - header) % 4 == 0 {
                for index in 0..<(entry.cmsg_len - header) / 4 {
                    received.descriptors.append(control.loadUnaligned(fromByteOffset: offset + header + 4 * index, as: Int32.self))
                }
            } else {
                received.unexpectedControl = true
            }
            offset += Self.aligned(entry.cmsg_len)
        }
        return received
    }

    /// shutdown(SHUT_RDWR): wakes a receive blocked on another thread; the descriptor stays open.
    func shutdown() { _ = Glibc.shutdown(descriptor, Int32(SHUT_RDWR)) }

    deinit { _ = Glibc.close(descriptor) }

    /// CMSG_ALIGN(sizeof(struct cmsghdr)): where a control message's data starts.
    static let controlHeaderBytes = aligned(MemoryLayout<cmsghdr>.size)
    /// CMSG_SPACE for `count` descriptors.
    static func controlSpace(_ count: Int) -> Int { controlHeaderBytes + aligned(4 * count) }
    private static func aligned(_ bytes: Int) -> Int { (bytes + MemoryLayout<Int>.size - 1) & ~(MemoryLayout<Int>.size - 1) }

    static func retrying<T: FixedWidthInteger>(_ call: () -> T) throws(Errno) -> T {
        while true {
            let result = call()
            if result != -1 { return result }
            if errno != EINTR { throw Errno(rawValue: errno) }
        }
    }
}
