@preconcurrency import Glibc
import Foundation
import KVTierCore
import KVTierSystem
import KVTierProtocol
import SystemPackage
import Testing
@testable import KVTierServer

/// Holds an arena for a provider closure.
// Invariant for @unchecked Sendable: `arena` is a let; its bytes are written by the test before
// any client connects and read afterwards, with the server's replies ordering the two.
final class ArenaBox: @unchecked Sendable {
    let arena: SharedArena
    init(capacity: Int) throws { arena = try SharedArena(name: "kvtier-arena-test", capacity: capacity) }
}

@Suite("Identity and shared memory")
struct IdentityTests {
    @Test("SO_PEERCRED reports this process's pid, uid and gid")
    func peerCredentials() throws {
        let pair = try FileDescriptor.unixSocketPair()
        defer {
            pair.0.closeIgnoringErrors()
            pair.1.closeIgnoringErrors()
        }
        let credentials = try PeerCredentials(ofSocket: pair.0.rawValue)
        #expect(credentials == PeerCredentials(pid: getpid(), uid: getuid(), gid: getgid()))
        #expect(throws: Errno.self) { try PeerCredentials(ofSocket: -1) }
    }

    @Test("the tenant mapping decides the tenant")
    func tenantMapping() async throws {
        let harness = try TestServer(tenantFor: { TenantID($0.uid &+ 1000) })
        let client = try TestClient(path: harness.path)
        #expect(try await client.hello().tenant == TenantID(getuid() &+ 1000))
        try await harness.stop()
    }

    @Test("a peer the tenant mapping refuses gets permissionDenied to HELLO and nothing else")
    func refusedPeer() async throws {
        let harness = try TestServer(tenantFor: { _ in nil })
        let client = try TestClient(path: harness.path)
        let (reply, _, _) = try await client.call(.hello(Hello(minVersion: ProtocolVersion.current, maxVersion: ProtocolVersion.current, capabilities: [], clientName: "refused")))
        guard case .error(_, let error) = reply else {
            Issue.record("HELLO of a refused peer was answered \(reply)")
            return
        }
        #expect(error.status == WireError.permissionDenied.rawValue, "\(error)")
        let (after, _, _) = try await client.call(.ping)
        guard case .error(_, let outOfOrder) = after else {
            Issue.record("PING after a refused HELLO was answered \(after)")
            return
        }
        #expect(outOfOrder.status == WireError.outOfOrder.rawValue, "no context: requests before a successful HELLO are out of order")
        try await harness.stop()
    }

    @Test("a client running as uid 65534 gets tenant 65534",
          .enabled(if: getuid() == 0 && access("/usr/bin/setpriv", X_OK) == 0 && access("/usr/bin/python3", X_OK) == 0,
                   "needs root, setpriv and /usr/bin/python3 to run a client as another uid"))
    func otherUID() async throws {
        let harness = try TestServer()
        let hello = try Request.hello(Hello(capabilities: [], clientName: "nobody")).encodeFrame(requestID: 3)
        let script = """
            import socket, struct, sys
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(60)
            s.connect(sys.argv[1])
            s.sendall(bytes.fromhex(sys.argv[2]))
            data = b""
            while len(data) < 16 or len(data) < 16 + struct.unpack("<I", data[:4])[0]:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            print(data.hex())
            """
        let arguments = ["--reuid", "65534", "--regid", "65534", "--clear-groups", "/usr/bin/python3", "-c", script,
                         harness.path, hello.map { String(format: "%02x", $0) }.joined()]
        let (data, errors, exitStatus) = try await onThread { () throws -> (Data, Data, Int32) in
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
            process.arguments = arguments
            let output = Pipe()
            let errorOutput = Pipe()
            process.standardOutput = output
            process.standardError = errorOutput
            try process.run()
            // Not readDataToEndOfFile: Foundation traps when a signal interrupts its read.
            let data = Self.readAll(output.fileHandleForReading.fileDescriptor)
            let errors = Self.readAll(errorOutput.fileHandleForReading.fileDescriptor)
            process.waitUntilExit()
            return (data, errors, process.terminationStatus)
        }
        #expect(exitStatus == 0, "client as uid 65534 failed: \(String(decoding: errors, as: UTF8.self))")
        let hex = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        var bytes: [UInt8] = []
        var index = hex.startIndex
        while index < hex.endIndex, let next = hex.index(index, offsetBy: 2, limitedBy: hex.endIndex) {
            bytes.append(UInt8(hex[index..<next], radix: 16) ?? 0)
            index = next
        }
        var decoder = FrameDecoder()
        decoder.append(bytes)
        let frame = try #require(try decoder.nextFrame())
        guard case .hello(let reply) = try Reply.decode(frame) else { throw TestFailure("HELLO of uid 65534 failed") }
        #expect(reply.tenant == TenantID(65534))
        #expect(frame.header.requestID == 3)
        try await harness.stop()
    }

    @Test("HELLO with the map capability carries the tenant's arena; the client maps it and sees the server's bytes")
    func arenaDescriptor() async throws {
        let capacity = 1 << 20
        let box = try ArenaBox(capacity: capacity)
        let pattern = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        box.arena.withBytes(SharedArena.Extent(offset: 8192, length: 4096)) { $0.copyBytes(from: pattern) }
        let harness = try TestServer(arenaProvider: { tenant in
            // The transport passes whatever arenas it is given: the same memfd twice will do here.
            tenant == TenantID(getuid())
                ? KVServer.TenantArenas(pages: (box.arena.descriptor, box.arena.capacity), staging: (box.arena.descriptor, box.arena.capacity)) : nil
        })
        let client = try TestClient(path: harness.path)
        let (reply, _, descriptors) = try await client.call(.hello(Hello(capabilities: .sharedMemory, clientName: "mapper")))
        guard case .hello(let hello) = reply else { throw TestFailure("HELLO failed: \(reply)") }
        #expect(hello.capabilities.contains(.sharedMemory))
        #expect(hello.arenaBytes == UInt64(capacity) && hello.stagingBytes == UInt64(capacity))
        let descriptor = try #require(descriptors.first)
        #expect(descriptors.count == 2, "the page arena and the staging arena")
        for extra in descriptors.dropFirst() { FileDescriptor(rawValue: extra).closeIgnoringErrors() }
        #expect(descriptor != box.arena.descriptor, "the client gets its own descriptor for the same memfd")
        let mapped = try SharedArena.map(descriptor: descriptor, capacity: Int(hello.arenaBytes))
        FileDescriptor(rawValue: descriptor).closeIgnoringErrors()
        let seen = mapped.withBytes(SharedArena.Extent(offset: 8192, length: 4096)) { Array($0) }
        #expect(seen == pattern)
        mapped.withBytes(SharedArena.Extent(offset: 0, length: 4096)) { $0[0] = 0xAB }
        #expect(box.arena.withBytes(SharedArena.Extent(offset: 0, length: 4096)) { $0[0] } == 0xAB)
        #expect(try await client.call(.ping).reply == .ping)

        let inline = try TestClient(path: harness.path)
        let plain = try await inline.call(.hello(Hello(capabilities: [], clientName: "inline")))
        guard case .hello(let plainHello) = plain.reply else { throw TestFailure("HELLO failed") }
        #expect(plainHello.arenaBytes == 0 && plain.descriptors.isEmpty, "a client that cannot map gets no descriptor")
        try await harness.stop()
    }

    @Test("an arena provider that fails leaves the connection without shared memory")
    func arenaProviderFailure() async throws {
        let harness = try TestServer(arenaProvider: { _ in throw TestFailure("no memory for arenas") })
        let client = try TestClient(path: harness.path)
        let (reply, _, descriptors) = try await client.call(.hello(Hello(capabilities: .sharedMemory, clientName: "mapper")))
        guard case .hello(let hello) = reply else { throw TestFailure("HELLO failed: \(reply)") }
        #expect(hello.capabilities == [] && hello.arenaBytes == 0 && descriptors.isEmpty)
        #expect(try await client.call(.ping).reply == .ping)
        try await harness.stop()
    }

    /// Everything until end of file, EINTR retried.
    static func readAll(_ descriptor: Int32) -> Data {
        var data = Data()
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(descriptor, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return data }
            data.append(contentsOf: chunk[0..<n])
        }
    }
}
