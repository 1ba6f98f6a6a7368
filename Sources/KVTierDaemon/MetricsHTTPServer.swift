#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import KVTierSystem
import Logging
import Synchronization
import SystemPackage

/// A minimal HTTP/1.1 responder for Prometheus scrapes, on one blocking thread: `GET /metrics`
/// answers the exposition, any other path 404, any other method 405; one request per
/// connection (`Connection: close`). Requests are bounded in size and time, so a slow or
/// hostile peer holds the thread for at most `ioTimeoutMillis`. swift-nio is not used: its
/// build cost is out of proportion to one endpoint scraped every few seconds (docs/operations.md).
public final class MetricsHTTPServer: Sendable {
    /// Largest request head read (request line and headers); larger gets 431.
    public static let maxRequestBytes = 8 * 1024
    /// Send and receive timeout of each connection.
    public static let ioTimeoutMillis = 2_000
    /// How often the accept loop checks for `stop()`.
    static let pollMillis: Int32 = 200

    public let endpoint: DaemonConfiguration.MetricsEndpoint
    /// The port actually bound (differs from `endpoint.port` when that is 0).
    public let boundPort: UInt16
    private let descriptor: Int32
    private let stopping = Atomic<Bool>(false)
    private let logger: Logger

    public struct StartError: Error, CustomStringConvertible {
        public var operation: String
        public var errno: Int32
        public var description: String { "metrics endpoint: \(operation): \(String(cString: strerror(errno))) (errno \(errno))" }
    }

    /// Binds and listens; `serve` answers on a thread of its own once `start` is called.
    public init(endpoint: DaemonConfiguration.MetricsEndpoint, logger: Logger) throws(StartError) {
        self.endpoint = endpoint
        self.logger = logger
        let v6 = endpoint.host.contains(":")
        let fd = socket(v6 ? AF_INET6 : AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw StartError(operation: "socket", errno: errno) }
        var one: Int32 = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var result: Int32
        if v6 {
            var address = sockaddr_in6()
            address.sin6_family = sa_family_t(AF_INET6)
            address.sin6_port = endpoint.port.bigEndian
            _ = inet_pton(AF_INET6, endpoint.host, &address.sin6_addr)
            result = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) }
            }
        } else {
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = endpoint.port.bigEndian
            _ = inet_pton(AF_INET, endpoint.host, &address.sin_addr)
            result = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
        }
        guard result == 0 else {
            let error = errno
            close(fd)
            throw StartError(operation: "bind \(endpoint)", errno: error)
        }
        guard listen(fd, 16) == 0 else {
            let error = errno
            close(fd)
            throw StartError(operation: "listen \(endpoint)", errno: error)
        }
        var bound = sockaddr_in6()
        var length = socklen_t(MemoryLayout<sockaddr_in6>.size)
        _ = withUnsafeMutablePointer(to: &bound) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        // sin_port and sin6_port sit at the same offset.
        boundPort = UInt16(bigEndian: bound.sin6_port)
        descriptor = fd
    }

    /// Serves on a detached thread until `stop()`; `exposition` is called once per scrape.
    public func start(exposition: @escaping @Sendable () -> [UInt8]) {
        do {
            try SystemThread(name: "kvt-metrics") { [self] in self.serve(exposition: exposition) }.detach()
        } catch {
            logger.error("metrics thread could not start", metadata: ["errno": "\(error.rawValue)"])
        }
    }

    /// Stops accepting and closes the socket (within `pollMillis`).
    public func stop() {
        stopping.store(true, ordering: .releasing)
    }

    private func serve(exposition: @Sendable () -> [UInt8]) {
        let listening = FileDescriptor(rawValue: descriptor)
        defer { listening.closeIgnoringErrors() }
        while !stopping.load(ordering: .acquiring) {
            guard (try? Poll.waitReadable(listening, timeoutMillis: Self.pollMillis)) == true,
                  let client = try? listening.acceptConnection(nonBlocking: false)
            else { continue }
            answer(client, exposition: exposition)
            client.closeIgnoringErrors()
        }
    }

    /// Reads one request head and writes one response.
    private func answer(_ client: FileDescriptor, exposition: () -> [UInt8]) {
        try? client.setTimeout(.receive, micros: Self.ioTimeoutMillis * 1000)
        try? client.setTimeout(.send, micros: Self.ioTimeoutMillis * 1000)
        var head: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 2048)
        let terminator: [UInt8] = Array("\r\n\r\n".utf8)
        while true {
            if head.count > Self.maxRequestBytes {
                respond(client, status: "431 Request Header Fields Too Large", body: Array("request too large\n".utf8))
                return
            }
            // Closed, reset or timed out: nothing to answer.
            guard let n = try? chunk.withUnsafeMutableBytes({ raw in try client.receive(into: raw) }), n > 0 else { return }
            head += chunk[0..<n]
            if head.count >= 4, head.firstRange(of: terminator) != nil { break }
        }
        let requestLine = head.split(separator: UInt8(ascii: "\r"), maxSplits: 1).first.map { String(decoding: $0, as: UTF8.self) } ?? ""
        let parts = requestLine.split(separator: " ")
        guard parts.count == 3, parts[2].hasPrefix("HTTP/1.") else {
            respond(client, status: "400 Bad Request", body: Array("bad request\n".utf8))
            return
        }
        let path = parts[1].split(separator: "?", maxSplits: 1).first.map(String.init) ?? ""
        guard parts[0] == "GET" || parts[0] == "HEAD" else {
            respond(client, status: "405 Method Not Allowed", body: Array("only GET\n".utf8), extraHeaders: "Allow: GET, HEAD\r\n")
            return
        }
        guard path == "/metrics" else {
            respond(client, status: "404 Not Found", body: Array("not found; metrics are at /metrics\n".utf8))
            return
        }
        respond(client, status: "200 OK", body: exposition(), contentType: "text/plain; version=0.0.4; charset=utf-8",
                omitBody: parts[0] == "HEAD")
    }

    private func respond(_ client: FileDescriptor, status: String, body: [UInt8], contentType: String = "text/plain; charset=utf-8",
                         extraHeaders: String = "", omitBody: Bool = false) {
        let header = "HTTP/1.1 \(status)\r\nContent-Type: \(contentType)\r\nContent-Length: \(body.count)\r\n\(extraHeaders)Connection: close\r\n\r\n"
        var bytes = Array(header.utf8)
        if !omitBody { bytes += body }
        // A peer that stops reading gives up the send after SO_SNDTIMEO; nothing else to do.
        try? client.sendAll(bytes)
    }
}
