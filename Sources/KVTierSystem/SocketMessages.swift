@preconcurrency import Glibc
import SystemPackage

/// Room for the control data of one `recvmsg`: SCM_RIGHTS for up to `maxDescriptors`
/// descriptors. Allocated once and reused across receives.
public struct ControlBuffer: ~Copyable {
    public let maxDescriptors: Int
    let bytes: UnsafeMutableRawBufferPointer

    public init(maxDescriptors: Int) {
        precondition(maxDescriptors > 0, "a control buffer needs room for at least one descriptor")
        self.maxDescriptors = maxDescriptors
        bytes = .allocate(byteCount: SocketControl.space(descriptors: maxDescriptors), alignment: MemoryLayout<Int>.alignment)
        bytes.initializeMemory(as: UInt8.self, repeating: 0)
    }

    deinit { bytes.deallocate() }
}

/// What one `receiveMessage` brought.
public struct ReceivedMessage: Sendable {
    /// Bytes read; 0 at end of stream.
    public var bytes: Int
    /// Descriptors that came with the bytes (close-on-exec); the caller owns and must close them.
    public var descriptors: [FileDescriptor]
    /// Descriptors beyond what the caller keeps, closed on arrival.
    public var extraDescriptorsClosed: Int
    /// The kernel cut the control data (MSG_CTRUNC): descriptors that did not fit were lost
    /// (the kernel closes them).
    public var controlTruncated: Bool
    /// Control messages other than SCM_RIGHTS, or malformed ones.
    public var unexpectedControl: Bool
}

/// Sending and receiving on sockets, with descriptors passed as SCM_RIGHTS. Sends use
/// MSG_NOSIGNAL, so a peer that went away is EPIPE, never SIGPIPE.
extension FileDescriptor {
    /// One sendmsg(MSG_NOSIGNAL [| MSG_DONTWAIT]); `descriptors` ride as SCM_RIGHTS on the first
    /// byte sent (they stay the caller's). Returns the bytes sent, possibly fewer than given;
    /// EAGAIN is thrown when a non-blocking send finds no room.
    public func sendMessage(_ bytes: UnsafeRawBufferPointer, descriptors: [FileDescriptor] = [], wait: Bool = true) throws(Errno) -> Int {
        let socket = rawValue
        let flags = Int32(MSG_NOSIGNAL) | (wait ? 0 : Int32(MSG_DONTWAIT))
        var vector = iovec(iov_base: UnsafeMutableRawPointer(mutating: bytes.baseAddress), iov_len: bytes.count)
        return try withUnsafeMutablePointer(to: &vector) { (vectorPointer) throws(Errno) -> Int in
            var message = msghdr()
            message.msg_iov = vectorPointer
            message.msg_iovlen = 1
            guard !descriptors.isEmpty else {
                return try SystemCall.retryingInterrupts { sendmsg(socket, &message, flags) }
            }
            let control = ControlBuffer(maxDescriptors: descriptors.count)
            SocketControl.writeRights(descriptors, into: control.bytes)
            message.msg_control = control.bytes.baseAddress
            message.msg_controllen = SocketControl.space(descriptors: descriptors.count)
            return try SystemCall.retryingInterrupts { sendmsg(socket, &message, flags) }
        }
    }

    /// One sendto(2) of a datagram to `address` (MSG_NOSIGNAL | MSG_DONTWAIT: never waits for a
    /// reader that lags; EAGAIN when its queue is full).
    public func sendDatagram(_ bytes: UnsafeRawBufferPointer, to address: UnixSocketAddress) throws(Errno) -> Int {
        let socket = rawValue
        let flags = Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT)
        return try address.withSocketAddress { (pointer, length) throws(Errno) -> Int in
            try SystemCall.retryingInterrupts { sendto(socket, bytes.baseAddress, bytes.count, flags, pointer, length) }
        }
    }

    /// Sends every byte, blocking while the socket is full (a socket with SO_SNDTIMEO gives up
    /// with EAGAIN). For blocking sockets; a non-blocking one would spin.
    public func sendAll(_ bytes: UnsafeRawBufferPointer) throws(Errno) {
        var sent = 0
        while sent < bytes.count {
            sent += try sendMessage(UnsafeRawBufferPointer(rebasing: bytes[sent...]))
        }
    }

    /// `sendAll` of an array's bytes.
    public func sendAll(_ bytes: [UInt8]) throws(Errno) {
        let outcome = bytes.withUnsafeBytes { raw in Result { () throws(Errno) in try sendAll(raw) } }
        try outcome.get()
    }

    /// One recv(2); 0 at end of stream. With `wait` false (MSG_DONTWAIT) EAGAIN is thrown when
    /// nothing is there. Descriptors a peer attaches are closed by the kernel, since no control
    /// buffer is offered: use this where descriptors are never accepted.
    public func receive(into buffer: UnsafeMutableRawBufferPointer, wait: Bool = true) throws(Errno) -> Int {
        let socket = rawValue
        let flags = wait ? Int32(0) : Int32(MSG_DONTWAIT)
        return try SystemCall.retryingInterrupts { recv(socket, buffer.baseAddress, buffer.count, flags) }
    }

    /// One recvmsg(MSG_CMSG_CLOEXEC), waiting as the socket's blocking mode says; 0 bytes at end
    /// of stream. Keeps the first `keepingAtMost` descriptors that came (default: all that fit
    /// `control`) and closes the rest, so a peer cannot make us hold descriptors we never use.
    public func receiveMessage(
        into buffer: UnsafeMutableRawBufferPointer, control: borrowing ControlBuffer, keepingAtMost keep: Int = .max
    ) throws(Errno) -> ReceivedMessage {
        let socket = rawValue
        var vector = iovec(iov_base: buffer.baseAddress, iov_len: buffer.count)
        var message = msghdr()
        message.msg_control = control.bytes.baseAddress
        message.msg_controllen = control.bytes.count
        let count = try withUnsafeMutablePointer(to: &vector) { (vectorPointer) throws(Errno) -> Int in
            message.msg_iov = vectorPointer
            message.msg_iovlen = 1
            return try SystemCall.retryingInterrupts { recvmsg(socket, &message, Int32(MSG_CMSG_CLOEXEC)) }
        }
        let parsed = SocketControl.readRights(UnsafeRawBufferPointer(rebasing: control.bytes[..<message.msg_controllen]))
        let kept = Array(parsed.descriptors.prefix(max(keep, 0)))
        let extra = parsed.descriptors.dropFirst(kept.count)
        for descriptor in extra { descriptor.closeIgnoringErrors() }
        return ReceivedMessage(
            bytes: count, descriptors: kept, extraDescriptorsClosed: extra.count,
            controlTruncated: message.msg_flags & Int32(MSG_CTRUNC) != 0, unexpectedControl: parsed.unexpected
        )
    }
}

/// The layout of control messages (the CMSG_* macros, which Swift cannot import).
enum SocketControl {
    /// CMSG_ALIGN(sizeof(struct cmsghdr)): where a control message's data starts.
    static let headerBytes = aligned(MemoryLayout<cmsghdr>.size)
    static let rightsType = Int32(SCM_RIGHTS)

    /// CMSG_SPACE for `count` descriptors.
    static func space(descriptors count: Int) -> Int { headerBytes + aligned(4 * count) }

    private static func aligned(_ bytes: Int) -> Int {
        (bytes + MemoryLayout<Int>.size - 1) & ~(MemoryLayout<Int>.size - 1)
    }

    /// One SCM_RIGHTS message carrying `descriptors` at the start of `control`.
    static func writeRights(_ descriptors: [FileDescriptor], into control: UnsafeMutableRawBufferPointer) {
        precondition(control.count >= space(descriptors: descriptors.count))
        let header = control.baseAddress!.bindMemory(to: cmsghdr.self, capacity: 1)
        header.pointee.cmsg_len = headerBytes + 4 * descriptors.count
        header.pointee.cmsg_level = SOL_SOCKET
        header.pointee.cmsg_type = rightsType
        for (index, descriptor) in descriptors.enumerated() {
            control.storeBytes(of: descriptor.rawValue, toByteOffset: headerBytes + 4 * index, as: Int32.self)
        }
    }

    /// The descriptors of every SCM_RIGHTS message in `control` (the bytes the kernel filled),
    /// and whether anything else, or anything malformed, was there.
    static func readRights(_ control: UnsafeRawBufferPointer) -> (descriptors: [FileDescriptor], unexpected: Bool) {
        var descriptors: [FileDescriptor] = []
        var unexpected = false
        var offset = 0
        while offset + headerBytes <= control.count {
            let entry = control.loadUnaligned(fromByteOffset: offset, as: cmsghdr.self)
            guard entry.cmsg_len >= headerBytes, offset + entry.cmsg_len <= control.count else {
                unexpected = true
                break
            }
            if entry.cmsg_level == SOL_SOCKET && entry.cmsg_type == rightsType && (entry.cmsg_len - headerBytes) % 4 == 0 {
                for index in 0..<(entry.cmsg_len - headerBytes) / 4 {
                    let raw = control.loadUnaligned(fromByteOffset: offset + headerBytes + 4 * index, as: Int32.self)
                    descriptors.append(FileDescriptor(rawValue: raw))
                }
            } else {
                unexpected = true
            }
            offset += aligned(entry.cmsg_len)
        }
        return (descriptors, unexpected)
    }
}
