@preconcurrency import Glibc
import KVTierCore
import KVTierProtocol
import KVTierSystem
import KVTierTestProcess
import SystemPackage

/// A connection that sends whatever bytes a test chooses, as a hostile client would: frames the
/// Swift client would never build, cut short, or with descriptors attached. Replies are read with
/// the protocol's own decoder.
final class RawConnection {
    let descriptor: Int32
    private var decoder = FrameDecoder()
    private var nextID: UInt32 = 1

    init(path: String) throws {
        let socket: FileDescriptor
        do { socket = try FileDescriptor.unixSocket() } catch { throw TestFailure("socket: \(error)") }
        do throws(Errno) {
            try socket.connect(to: UnixSocketAddress(path))
        } catch {
            socket.closeIgnoringErrors()
            throw TestFailure("connect \(path): \(error) (errno \(error.rawValue))")
        }
        descriptor = socket.rawValue
    }

    deinit { close(descriptor) }

    /// A frame: 16-byte header then `body`, as docs/protocol.md lays it out.
    static func frame(opcode: UInt16, body: [UInt8], requestID: UInt32 = 7, flags: UInt16 = 0, status: UInt32 = 0) -> [UInt8] {
        var writer = ByteWriter()
        writer.u32(UInt32(body.count))
        writer.u16(opcode)
        writer.u16(flags)
        writer.u32(requestID)
        writer.u32(status)
        writer.raw(body)
        return writer.bytes
    }

    /// Sends all of `bytes`; `descriptors` ride as SCM_RIGHTS on the first byte. False once the
    /// daemon has closed the connection (EPIPE, ECONNRESET): fine for a hostile input.
    @discardableResult
    func send(_ bytes: [UInt8], descriptors: [Int32] = []) -> Bool {
        var sent = 0
        var attach = descriptors
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { raw -> Int in
                var vector = iovec(iov_base: UnsafeMutableRawPointer(mutating: raw.baseAddress! + sent), iov_len: raw.count - sent)
                var message = msghdr()
                let space = attach.isEmpty ? 0 : Self.controlSpace(attach.count)
                let control = UnsafeMutableRawBufferPointer.allocate(byteCount: max(space, 1), alignment: 8)
                defer { control.deallocate() }
                control.initializeMemory(as: UInt8.self, repeating: 0)
                if space > 0 {
                    let header = control.baseAddress!.bindMemory(to: cmsghdr.self, capacity: 1)
                    header.pointee.cmsg_len = Self.controlHeaderBytes + 4 * attach.count
                    header.pointee.cmsg_level = SOL_SOCKET
                    header.pointee.cmsg_type = Int32(SCM_RIGHTS)
                    attach.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: control[Self.controlHeaderBytes...]).copyMemory(from: $0) }
                    message.msg_control = control.baseAddress
                    message.msg_controllen = space
                }
                return withUnsafeMutablePointer(to: &vector) { pointer in
                    message.msg_iov = pointer
                    message.msg_iovlen = 1
                    return sendmsg(descriptor, &message, Int32(MSG_NOSIGNAL))
                }
            }
            if n < 0 {
                if errno == EINTR { continue }
                return false
            }
            attach = []
            sent += n
        }
        return true
    }

    /// No more requests: the daemon sees the end of the stream (mid-frame, for a cut input).
    func shutdownSending() { _ = shutdown(descriptor, Int32(SHUT_WR)) }

    /// The next reply frame, nil when the daemon closed the connection (or sent bytes the
    /// decoder refuses); throws when nothing came within `seconds`.
    func reply(seconds: Int = 30) throws -> Frame? {
        let deadline = Clocks.monotonicMicros() + UInt64(seconds) * 1_000_000
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            do {
                if let frame = try decoder.nextFrame() { return frame }
            } catch {
                return nil
            }
            let now = Clocks.monotonicMicros()
            guard now < deadline else { throw TestFailure("no reply within \(seconds) s") }
            var poller = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
            let ready = poll(&poller, 1, Int32((deadline - now) / 1000) + 1)
            if ready < 0 && errno == EINTR { continue }
            guard ready > 0 else { continue }
            let n = buffer.withUnsafeMutableBytes { recv(descriptor, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return nil }
            decoder.append(Array(buffer[0..<n]))
        }
    }

    /// Reads replies until the daemon closes the connection; throws if it does not within
    /// `seconds` (a daemon that hangs on an input fails the test as a crash would).
    func drainUntilClosed(seconds: Int = 30) throws {
        while try reply(seconds: seconds) != nil {}
    }

    /// Sends `request` and decodes its reply (nil: the connection was closed instead).
    func call(_ request: Request) throws -> Reply? {
        let id = nextID
        nextID += 1
        guard send(try request.encodeFrame(requestID: id)), let frame = try reply() else { return nil }
        let inline: Bool
        if case .get(let get) = request { inline = get.inline } else { inline = false }
        return try Reply.decode(frame, getInline: inline)
    }

    /// `HELLO` without shared memory (no descriptor comes back).
    func hello() throws {
        guard case .hello = try call(.hello(Hello(capabilities: [], clientName: "hostile-test"))) else {
            throw TestFailure("HELLO was not answered")
        }
    }

    static let controlHeaderBytes = (MemoryLayout<cmsghdr>.size + 7) & ~7
    static func controlSpace(_ count: Int) -> Int { controlHeaderBytes + ((4 * count + 7) & ~7) }
}

/// The descriptors `pid` holds now (`/proc/PID/fd`), or nil when that cannot be read.
func openDescriptorCount(_ pid: pid_t) -> Int? {
    guard let directory = opendir("/proc/\(pid)/fd") else { return nil }
    defer { closedir(directory) }
    var count = 0
    while let entry = readdir(directory) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if name != "." && name != ".." { count += 1 }
    }
    return count
}

