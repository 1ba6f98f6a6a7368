@preconcurrency import Glibc
import KVTierSystem
import SystemPackage
import Testing

/// Whether the other ends of `pipe` are all closed: a read of an empty non-blocking pipe says
/// end of file (0) then, and EAGAIN while some process still holds a write end.
private func writersGone(_ readEnd: FileDescriptor) throws -> Bool {
    var byte: UInt8 = 0
    do {
        return try withUnsafeMutableBytes(of: &byte) { raw in try readEnd.readSome(into: raw) } == 0
    } catch Errno.resourceTemporarilyUnavailable {
        return false
    }
}

@Suite struct UnixSocketTests {
    @Test func descriptorsRoundTripAndExtrasAreClosed() throws {
        let (left, right) = try FileDescriptor.unixSocketPair()
        defer {
            left.closeIgnoringErrors()
            right.closeIgnoringErrors()
        }
        // Three pipes; their write ends travel, and whether a write end is still open anywhere
        // shows on the read end.
        let pipes = try (0..<3).map { _ in try FileDescriptor.nonBlockingPipe() }
        defer { for pipe in pipes { pipe.readEnd.closeIgnoringErrors() } }
        let message: [UInt8] = Array("hello".utf8)
        let sent = try message.withUnsafeBytes { (raw) throws(Errno) in
            try left.sendMessage(raw, descriptors: pipes.map(\.writeEnd))
        }
        #expect(sent == message.count)
        for pipe in pipes { pipe.writeEnd.closeIgnoringErrors() }  // In flight, they hold the pipes open.
        for pipe in pipes { #expect(try !writersGone(pipe.readEnd)) }

        let control = ControlBuffer(maxDescriptors: 4)
        var buffer = [UInt8](repeating: 0, count: 64)
        let received = try buffer.withUnsafeMutableBytes { (raw) throws(Errno) in
            try right.receiveMessage(into: raw, control: control, keepingAtMost: 1)
        }
        #expect(received.bytes == message.count)
        #expect(Array(buffer[..<received.bytes]) == message)
        #expect(received.descriptors.count == 1)
        #expect(received.extraDescriptorsClosed == 2)
        #expect(!received.controlTruncated && !received.unexpectedControl)
        // The kept one is close-on-exec (MSG_CMSG_CLOEXEC) and still holds its pipe open; the
        // extras were closed, so their pipes have no writer left.
        let kept = try #require(received.descriptors.first)
        #expect(fcntl(kept.rawValue, F_GETFD) & FD_CLOEXEC != 0)
        #expect(try !writersGone(pipes[0].readEnd))
        #expect(try writersGone(pipes[1].readEnd))
        #expect(try writersGone(pipes[2].readEnd))
        try kept.writeByte(7)
        kept.closeIgnoringErrors()
        var byte: UInt8 = 0
        _ = try withUnsafeMutableBytes(of: &byte) { raw in try pipes[0].readEnd.readSome(into: raw) }
        #expect(byte == 7, "the byte written through the passed descriptor arrives")
        #expect(try writersGone(pipes[0].readEnd))
    }

    @Test func moreDescriptorsThanTheControlBufferHoldsAreReportedTruncated() throws {
        let (left, right) = try FileDescriptor.unixSocketPair()
        defer {
            left.closeIgnoringErrors()
            right.closeIgnoringErrors()
        }
        let pipes = try (0..<3).map { _ in try FileDescriptor.nonBlockingPipe() }
        defer { for pipe in pipes { pipe.readEnd.closeIgnoringErrors() } }
        _ = try [UInt8(1)].withUnsafeBytes { raw in try left.sendMessage(raw, descriptors: pipes.map(\.writeEnd)) }
        for pipe in pipes { pipe.writeEnd.closeIgnoringErrors() }
        let control = ControlBuffer(maxDescriptors: 1)
        var buffer = [UInt8](repeating: 0, count: 8)
        let received = try buffer.withUnsafeMutableBytes { raw in try right.receiveMessage(into: raw, control: control) }
        #expect(received.controlTruncated)
        #expect(received.descriptors.count < 3, "room for fewer than three (CMSG_SPACE rounds up to two on 64-bit)")
        for descriptor in received.descriptors { descriptor.closeIgnoringErrors() }
        for pipe in pipes { #expect(try writersGone(pipe.readEnd), "the kernel closes what did not fit") }
    }

    @Test func aPathTooLongForSunPathIsRefused() throws {
        let fits = "/" + String(repeating: "a", count: UnixSocketAddress.maxPathBytes - 1)
        _ = try UnixSocketAddress(fits)
        let long = fits + "b"
        #expect(throws: Errno.fileNameTooLong) { _ = try UnixSocketAddress(long) }
        #expect(throws: Errno.invalidArgument) { _ = try UnixSocketAddress("") }
        #expect(throws: Errno.invalidArgument) { _ = try UnixSocketAddress("/tmp/a\0b") }
        // An abstract name carries no terminating NUL but a leading one.
        #expect(try UnixSocketAddress.abstract(String(repeating: "a", count: UnixSocketAddress.maxPathBytes)).description.count == 108)
        #expect(throws: Errno.fileNameTooLong) {
            _ = try UnixSocketAddress.abstract(String(repeating: "a", count: UnixSocketAddress.maxPathBytes + 1))
        }
    }

    @Test func listenAcceptConnectAndPeerCredentials() throws {
        let directory = try TestDirectory(socketsNamed: "socket")
        let address = try UnixSocketAddress("\(directory.path)/s")
        let listener = try FileDescriptor.unixSocket(nonBlocking: true)
        defer { listener.closeIgnoringErrors() }
        try listener.bind(to: address)
        try listener.listen(backlog: 4)
        #expect(try listener.socketOption(SO_ACCEPTCONN) == 1)
        #expect(try listener.socketOption(SO_TYPE) == FileDescriptor.streamSocketType)
        #expect(try listener.socketOption(FileDescriptor.socketDomainOption) == AF_UNIX)
        #expect(throws: Errno.resourceTemporarilyUnavailable, "nobody is connecting yet") { _ = try listener.acceptConnection() }

        let client = try FileDescriptor.unixSocket()
        defer { client.closeIgnoringErrors() }
        try client.connect(to: address)
        #expect(try Poll.waitReadable(listener, timeoutMillis: 10_000))
        let server = try listener.acceptConnection()
        defer { server.closeIgnoringErrors() }
        #expect(fcntl(server.rawValue, F_GETFL) & O_NONBLOCK != 0, "accepted connections are non-blocking")

        let peer = try server.peerCredentials()
        #expect(peer.pid == getpid() && peer.uid == geteuid() && peer.gid == getegid())

        try Array("ping".utf8).withUnsafeBytes { raw in try client.sendAll(raw) }
        #expect(try Poll.waitReadable(server, timeoutMillis: 10_000))
        var buffer = [UInt8](repeating: 0, count: 16)
        let count = try buffer.withUnsafeMutableBytes { raw in try server.receive(into: raw, wait: false) }
        #expect(Array(buffer[..<count]) == Array("ping".utf8))
        #expect(throws: Errno.resourceTemporarilyUnavailable) {
            _ = try buffer.withUnsafeMutableBytes { raw in try server.receive(into: raw, wait: false) }
        }
        client.shutdown(.send)
        #expect(try buffer.withUnsafeMutableBytes { raw in try server.receive(into: raw) } == 0, "end of stream")

        let refused = try FileDescriptor.unixSocket()
        defer { refused.closeIgnoringErrors() }
        #expect(throws: Errno.noSuchFileOrDirectory) { try refused.connect(to: UnixSocketAddress("\(directory.path)/none")) }
    }

    @Test func datagramsReachAnAbstractName() throws {
        let address = try UnixSocketAddress.abstract("kvtier-system-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        let receiver = try FileDescriptor.unixSocket(.datagram)
        defer { receiver.closeIgnoringErrors() }
        try receiver.bind(to: address)
        let sender = try FileDescriptor.unixSocket(.datagram)
        defer { sender.closeIgnoringErrors() }
        let sent = try Array("READY=1".utf8).withUnsafeBytes { raw in try sender.sendDatagram(raw, to: address) }
        #expect(sent == 7)
        #expect(try Poll.waitReadable(receiver, timeoutMillis: 10_000))
        var buffer = [UInt8](repeating: 0, count: 64)
        let count = try buffer.withUnsafeMutableBytes { raw in try receiver.receive(into: raw, wait: false) }
        #expect(Array(buffer[..<count]) == Array("READY=1".utf8))
        let nobody = try UnixSocketAddress.abstract("kvtier-system-test-nobody-\(getpid())")
        #expect(throws: Errno.connectionRefused) {
            _ = try [UInt8(1)].withUnsafeBytes { raw in try sender.sendDatagram(raw, to: nobody) }
        }
    }

    @Test func aReceiveTimeoutEndsABlockingReceive() throws {
        let (left, right) = try FileDescriptor.unixSocketPair()
        defer {
            left.closeIgnoringErrors()
            right.closeIgnoringErrors()
        }
        try right.setTimeout(.receive, micros: 1_000)
        var buffer = [UInt8](repeating: 0, count: 8)
        #expect(throws: Errno.resourceTemporarilyUnavailable) {
            _ = try buffer.withUnsafeMutableBytes { raw in try right.receive(into: raw) }
        }
    }

    @Test func aSendToAClosedPeerIsEPIPENotSIGPIPE() throws {
        let (left, right) = try FileDescriptor.unixSocketPair()
        defer { left.closeIgnoringErrors() }
        right.closeIgnoringErrors()
        #expect(throws: Errno.brokenPipe) {
            try [UInt8(1)].withUnsafeBytes { raw in try left.sendAll(raw) }
        }
    }

    @Test func pollTimesOutAndSeesAWakeByte() throws {
        let pipe = try FileDescriptor.nonBlockingPipe()
        defer {
            pipe.readEnd.closeIgnoringErrors()
            pipe.writeEnd.closeIgnoringErrors()
        }
        #expect(try !Poll.waitReadable(pipe.readEnd, timeoutMillis: 1))
        try pipe.writeEnd.writeByte(1)
        try pipe.writeEnd.writeByte(2)
        #expect(try Poll.waitReadable(pipe.readEnd, timeoutMillis: 10_000))
        pipe.readEnd.drain()
        #expect(try !Poll.waitReadable(pipe.readEnd, timeoutMillis: 0), "drained")
    }
}
