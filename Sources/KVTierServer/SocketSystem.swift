@preconcurrency import Glibc
import SystemPackage

/// The socket and file system calls of the server, each wrapped once: failures become `Errno`,
/// EINTR is retried (poll reports it as "nothing ready" so its caller recomputes the deadline).
/// accept4, pipe2 and pthread_setname_np sit behind _GNU_SOURCE, which Swift's Glibc module does
/// not define, so they are looked up in libc at run time like `memfd_create` in KVTierIO.
enum SocketSystem {
    /// Linux ABI values Swift's Glibc module leaves out or imports with awkward types.
    static let streamType = Int32(SOCK_STREAM.rawValue)
    static let closeOnExecFlag = Int32(SOCK_CLOEXEC.rawValue)
    static let nonBlockingFlag = Int32(SOCK_NONBLOCK.rawValue)
    static let noSignal = Int32(MSG_NOSIGNAL)
    static let rightsType = Int32(SCM_RIGHTS)
    static let domainOption: Int32 = 39  // SO_DOMAIN

    /// `sun_path` is 108 bytes including the terminating NUL.
    static let maxPathBytes = 107

    private typealias Accept4 = @convention(c) (Int32, UnsafeMutablePointer<sockaddr>?, UnsafeMutablePointer<socklen_t>?, Int32) -> Int32
    private typealias Pipe2 = @convention(c) (UnsafeMutablePointer<Int32>, Int32) -> Int32

    static func retrying(_ call: () -> Int32) throws(Errno) -> Int32 {
        while true {
            let result = call()
            if result != -1 { return result }
            if errno != EINTR { throw Errno(rawValue: errno) }
        }
    }

    static func retrying(_ call: () -> Int) throws(Errno) -> Int {
        while true {
            let result = call()
            if result != -1 { return result }
            if errno != EINTR { throw Errno(rawValue: errno) }
        }
    }

    /// A close-on-exec Unix stream socket.
    static func makeSocket(nonBlocking: Bool = false) throws(Errno) -> Int32 {
        let type = streamType | closeOnExecFlag | (nonBlocking ? nonBlockingFlag : 0)
        return try retrying { socket(AF_UNIX, type, 0) }
    }

    /// Runs `body` with the `sockaddr_un` of `path`; ENAMETOOLONG when it does not fit, EINVAL
    /// when it holds a NUL.
    static func withAddress<R>(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> R) throws(Errno) -> R {
        let bytes = Array(path.utf8)
        guard !bytes.contains(0), !bytes.isEmpty else { throw .invalidArgument }
        guard bytes.count <= maxPathBytes else { throw .fileNameTooLong }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }

    static func bind(_ descriptor: Int32, path: String) throws(Errno) {
        let result = try withAddress(path) { address, length in Glibc.bind(descriptor, address, length) }
        if result != 0 { throw Errno(rawValue: errno) }
    }

    /// connect; an interrupted connect keeps going in the kernel, so EINTR is followed by a wait
    /// for writability and the socket's pending error.
    static func connect(_ descriptor: Int32, path: String) throws(Errno) {
        let result = try withAddress(path) { address, length in Glibc.connect(descriptor, address, length) }
        guard result != 0 else { return }
        guard errno == EINTR else { throw Errno(rawValue: errno) }
        var fds = [pollfd(fd: descriptor, events: Int16(POLLOUT), revents: 0)]
        while try poll(&fds, timeoutMillis: -1) == 0 {}
        var pending: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        _ = try retrying { getsockopt(descriptor, SOL_SOCKET, SO_ERROR, &pending, &length) }
        if pending != 0 { throw Errno(rawValue: pending) }
    }

    static func listen(_ descriptor: Int32, backlog: Int32) throws(Errno) {
        _ = try retrying { Glibc.listen(descriptor, backlog) }
    }

    /// accept4(CLOEXEC | NONBLOCK): the connection's thread waits with poll, never in a call.
    static func accept(_ descriptor: Int32) throws(Errno) -> Int32 {
        guard let symbol = dlsym(nil, "accept4") else { throw .noFunction }
        let accept4 = unsafeBitCast(symbol, to: Accept4.self)
        return try retrying { accept4(descriptor, nil, nil, closeOnExecFlag | nonBlockingFlag) }
    }

    /// poll; returns how many descriptors are ready, 0 on timeout or EINTR.
    static func poll(_ fds: inout [pollfd], timeoutMillis: Int32) throws(Errno) -> Int {
        let count = nfds_t(fds.count)
        let result = fds.withUnsafeMutableBufferPointer { Glibc.poll($0.baseAddress, count, timeoutMillis) }
        if result >= 0 { return Int(result) }
        if errno == EINTR { return 0 }
        throw Errno(rawValue: errno)
    }

    /// recv without waiting; 0 at end of stream. Descriptors a peer attaches are discarded
    /// (closed) by the kernel, since no control buffer is offered.
    static func receive(_ descriptor: Int32, into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
        try retrying { recv(descriptor, buffer.baseAddress, buffer.count, Int32(MSG_DONTWAIT)) }
    }

    /// sendmsg(MSG_NOSIGNAL | MSG_DONTWAIT); `descriptors` ride as SCM_RIGHTS on the first byte
    /// sent. Returns the bytes sent (EAGAIN is thrown).
    static func send(_ descriptor: Int32, _ bytes: UnsafeRawBufferPointer, descriptors: [Int32] = []) throws(Errno) -> Int {
        var vector = iovec(iov_base: UnsafeMutableRawPointer(mutating: bytes.baseAddress), iov_len: bytes.count)
        return try withUnsafeMutablePointer(to: &vector) { (vectorPointer) throws(Errno) -> Int in
            var message = msghdr()
            message.msg_iov = vectorPointer
            message.msg_iovlen = 1
            guard !descriptors.isEmpty else {
                return try retrying { sendmsg(descriptor, &message, noSignal | Int32(MSG_DONTWAIT)) }
            }
            let control = UnsafeMutableRawBufferPointer.allocate(byteCount: controlSpace(descriptors.count), alignment: 8)
            defer { control.deallocate() }
            control.initializeMemory(as: UInt8.self, repeating: 0)
            let header = control.baseAddress!.bindMemory(to: cmsghdr.self, capacity: 1)
            header.pointee.cmsg_len = controlHeaderBytes + 4 * descriptors.count
            header.pointee.cmsg_level = SOL_SOCKET
            header.pointee.cmsg_type = rightsType
            descriptors.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: control[controlHeaderBytes...]).copyMemory(from: $0) }
            message.msg_control = control.baseAddress
            message.msg_controllen = control.count
            return try retrying { sendmsg(descriptor, &message, noSignal | Int32(MSG_DONTWAIT)) }
        }
    }

    /// recvmsg(MSG_CMSG_CLOEXEC), waiting as the socket's blocking mode says; returns the bytes
    /// read and the descriptors received (the caller owns them). For clients and tests: the
    /// daemon never accepts descriptors.
    static func receiveMessage(_ descriptor: Int32, into buffer: UnsafeMutableRawBufferPointer,
                               maxDescriptors: Int = 4) throws(Errno) -> (bytes: Int, descriptors: [Int32]) {
        var vector = iovec(iov_base: buffer.baseAddress, iov_len: buffer.count)
        let control = UnsafeMutableRawBufferPointer.allocate(byteCount: controlSpace(maxDescriptors), alignment: 8)
        defer { control.deallocate() }
        control.initializeMemory(as: UInt8.self, repeating: 0)
        var message = msghdr()
        message.msg_control = control.baseAddress
        message.msg_controllen = control.count
        let count = try withUnsafeMutablePointer(to: &vector) { (vectorPointer) throws(Errno) -> Int in
            message.msg_iov = vectorPointer
            message.msg_iovlen = 1
            return try retrying { recvmsg(descriptor, &message, Int32(MSG_CMSG_CLOEXEC)) }
        }
        var descriptors: [Int32] = []
        var offset = 0
        while offset + controlHeaderBytes <= message.msg_controllen {
            let header = control.load(fromByteOffset: offset, as: cmsghdr.self)
            guard header.cmsg_len >= controlHeaderBytes, offset + header.cmsg_len <= message.msg_controllen else { break }
            if header.cmsg_level == SOL_SOCKET && header.cmsg_type == rightsType {
                for index in 0..<(header.cmsg_len - controlHeaderBytes) / 4 {
                    descriptors.append(control.loadUnaligned(fromByteOffset: offset + controlHeaderBytes + 4 * index, as: Int32.self))
                }
            }
            offset += aligned(header.cmsg_len)
        }
        return (count, descriptors)
    }

    /// CMSG_ALIGN(sizeof(struct cmsghdr)): where a control message's data starts.
    static let controlHeaderBytes = aligned(MemoryLayout<cmsghdr>.size)
    /// CMSG_SPACE for `count` descriptors.
    static func controlSpace(_ count: Int) -> Int { controlHeaderBytes + aligned(4 * max(count, 1)) }
    private static func aligned(_ bytes: Int) -> Int { (bytes + MemoryLayout<Int>.size - 1) & ~(MemoryLayout<Int>.size - 1) }

    /// SO_PEERCRED: `struct ucred { pid_t pid; uid_t uid; gid_t gid; }`.
    static func peerCredentials(_ descriptor: Int32) throws(Errno) -> (pid: Int32, uid: UInt32, gid: UInt32) {
        var fields: (Int32, UInt32, UInt32) = (0, 0, 0)
        var length = socklen_t(MemoryLayout.size(ofValue: fields))
        _ = try retrying { getsockopt(descriptor, SOL_SOCKET, SO_PEERCRED, &fields, &length) }
        guard length == MemoryLayout.size(ofValue: fields) else { throw .invalidArgument }
        return fields
    }

    static func integerOption(_ descriptor: Int32, _ option: Int32) throws(Errno) -> Int32 {
        var value: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        _ = try retrying { getsockopt(descriptor, SOL_SOCKET, option, &value, &length) }
        return value
    }

    static func setStatusFlags(_ descriptor: Int32, adding flags: Int32) throws(Errno) {
        let current = try retrying { fcntl(descriptor, F_GETFL) }
        _ = try retrying { fcntl(descriptor, F_SETFL, current | flags) }
    }

    static func setCloseOnExec(_ descriptor: Int32) throws(Errno) {
        let current = try retrying { fcntl(descriptor, F_GETFD) }
        _ = try retrying { fcntl(descriptor, F_SETFD, current | FD_CLOEXEC) }
    }

    /// shutdown(2): wakes a thread polling or sending on the socket; the descriptor stays open.
    static func shutdown(_ descriptor: Int32, how: Int32 = Int32(SHUT_RDWR)) {
        _ = Glibc.shutdown(descriptor, how)
    }

    /// close, not retried on EINTR: Linux releases the descriptor even then.
    static func close(_ descriptor: Int32) {
        _ = Glibc.close(descriptor)
    }

    /// pipe2(O_CLOEXEC | O_NONBLOCK).
    static func makePipe() throws(Errno) -> (read: Int32, write: Int32) {
        guard let symbol = dlsym(nil, "pipe2") else { throw .noFunction }
        let pipe2 = unsafeBitCast(symbol, to: Pipe2.self)
        var ends: (Int32, Int32) = (-1, -1)
        _ = try withUnsafeMutablePointer(to: &ends) { (pointer) throws(Errno) -> Int32 in
            try pointer.withMemoryRebound(to: Int32.self, capacity: 2) { (ends) throws(Errno) -> Int32 in
                try retrying { pipe2(ends, O_CLOEXEC | O_NONBLOCK) }
            }
        }
        return (ends.0, ends.1)
    }

    /// read(2) from a non-blocking pipe; EAGAIN is thrown.
    static func receivePipe(_ descriptor: Int32, into buffer: UnsafeMutableRawBufferPointer) throws(Errno) -> Int {
        try retrying { Glibc.read(descriptor, buffer.baseAddress, buffer.count) }
    }

    static func write(_ descriptor: Int32, byte: UInt8) throws(Errno) {
        var value = byte
        _ = try retrying { Glibc.write(descriptor, &value, 1) }
    }

    /// lstat; nil when nothing is at `path`.
    static func linkStatus(_ path: String) throws(Errno) -> stat? {
        var status = stat()
        if lstat(path, &status) == 0 { return status }
        if errno == ENOENT { return nil }
        throw Errno(rawValue: errno)
    }

    static func unlink(_ path: String) throws(Errno) {
        _ = try retrying { Glibc.unlink(path) }
    }

    static func changeMode(_ path: String, _ mode: mode_t) throws(Errno) {
        _ = try retrying { chmod(path, mode) }
    }

    /// mkdir; an existing entry is not an error here (the caller checks it is a directory).
    static func makeDirectory(_ path: String, mode: mode_t) throws(Errno) {
        if mkdir(path, mode) == 0 || errno == EEXIST { return }
        throw Errno(rawValue: errno)
    }

    /// Names the calling thread (at most 15 bytes are kept); best effort.
    static func nameCurrentThread(_ name: String) {
        typealias SetName = @convention(c) (pthread_t, UnsafePointer<CChar>) -> Int32
        guard let symbol = dlsym(nil, "pthread_setname_np") else { return }
        let setName = unsafeBitCast(symbol, to: SetName.self)
        _ = String(decoding: name.utf8.prefix(15), as: UTF8.self).withCString { setName(pthread_self(), $0) }
    }
}
