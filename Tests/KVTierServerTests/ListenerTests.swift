@preconcurrency import Glibc
import KVTierCore
import KVTierProtocol
import KVTierSystem
import SystemPackage
import Testing
@testable import KVTierServer

@Suite("UnixListener")
struct ListenerTests {
    private func mode(of path: String) -> mode_t? {
        var status = stat()
        return lstat(path, &status) == 0 ? status.st_mode & 0o7777 : nil
    }

    private func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    @Test("binding creates missing parent directories (0755) and a socket file any user may connect to (0666); close removes it")
    func bindAndClose() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let path = directory.path + "/run/kvtier/kvtierd.sock"
        let listener = try UnixListener(path: path)
        #expect(mode(of: directory.path + "/run") == 0o755)
        #expect(mode(of: directory.path + "/run/kvtier") == 0o755)
        #expect(mode(of: path) == 0o666)
        #expect(listener.path == path)
        #expect(fcntl(listener.descriptor, F_GETFD) & FD_CLOEXEC != 0)
        _ = try TestClient(path: path)
        listener.close()
        #expect(!exists(path))
        listener.close()
    }

    @Test("a socket file nobody listens on (a crashed daemon's) is replaced")
    func staleSocket() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let path = directory.path + "/kvtierd.sock"
        let leftover = try FileDescriptor.unixSocket()
        try leftover.bind(to: UnixSocketAddress(path))
        leftover.closeIgnoringErrors()
        #expect(exists(path))
        let listener = try UnixListener(path: path, mode: 0o600)
        #expect(mode(of: path) == 0o600)
        _ = try TestClient(path: path)
        listener.close()
    }

    @Test("a second daemon on a live socket is refused and the first keeps its socket")
    func liveSocket() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let path = directory.path + "/kvtierd.sock"
        let first = try UnixListener(path: path)
        #expect(throws: ServerError.addressInUse(path: path)) { try UnixListener(path: path) }
        #expect(exists(path))
        _ = try TestClient(path: path)
        first.close()
    }

    @Test("a file that is not a socket is never removed; an overlong path is refused")
    func notASocket() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let path = directory.path + "/kvtierd.sock"
        let file = open(path, O_CREAT | O_WRONLY, 0o644)
        #expect(file >= 0)
        close(file)
        #expect(throws: ServerError.pathNotASocket(path: path)) { try UnixListener(path: path) }
        #expect(exists(path))
        let long = directory.path + "/" + String(repeating: "s", count: 120)
        #expect(throws: ServerError.pathTooLong(path: long)) { try UnixListener(path: long) }
    }

    @Test("an already-listening descriptor is adopted and served; its socket file is left to its owner")
    func adopt() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let path = directory.path + "/activated.sock"
        let socket = try FileDescriptor.unixSocket()
        try socket.bind(to: UnixSocketAddress(path))
        try socket.listen(backlog: 8)
        let listener = try UnixListener(adopting: socket.rawValue)
        #expect(listener.path == nil)
        let server = KVServer(listener: listener, handler: CountersHandler(counters: ServerCounters()), logger: quietLogger)
        let running = Task { try await server.run() }
        let client = try TestClient(path: path)
        #expect(try await client.hello().version == ProtocolVersion.current)
        server.shutdown()
        try await running.value
        #expect(exists(path))

        let unlistened = try FileDescriptor.unixSocket()
        defer { unlistened.closeIgnoringErrors() }
        #expect(throws: ServerError.notAListeningSocket(descriptor: unlistened.rawValue)) { try UnixListener(adopting: unlistened.rawValue) }
        let file = open(directory.path + "/plain", O_CREAT | O_RDWR | O_CLOEXEC, 0o644)
        defer { close(file) }
        #expect(throws: ServerError.notAListeningSocket(descriptor: file)) { try UnixListener(adopting: file) }
    }
}
