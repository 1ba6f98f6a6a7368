#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// A minimal Redis client over a Unix socket speaking RESP2, for the `--compare-redis` baseline
/// of `kvtier bench serve`: blocking calls, one command in flight. `SET` sends the value with one
/// gathered write (no copy into an output buffer); `GET` receives the value straight into the
/// caller's buffer. That is the cheapest a client can be, so the baseline is not handicapped.
final class RESPConnection {
    enum Value: Equatable {
        case simple(String)
        case error(String)
        case integer(Int)
        case bulk([UInt8]?)
    }

    private var fd: Int32
    /// Bytes received and not consumed yet: `buffer[head..<tail]`.
    private let buffer: UnsafeMutableRawBufferPointer
    private var head = 0
    private var tail = 0

    init(path: String) throws {
        let bytes = Array(path.utf8)
        guard bytes.count < 108 else { throw ToolError("socket path too long: \(path)") }
        let descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard descriptor >= 0 else { throw ToolError("socket: errno \(errno)") }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard result == 0 else {
            let error = errno
            close(descriptor)
            throw ToolError("cannot connect to redis at \(path): errno \(error)")
        }
        fd = descriptor
        buffer = .allocate(byteCount: 1 << 16, alignment: 64)
    }

    deinit {
        if fd >= 0 { close(fd) }
        buffer.deallocate()
    }

    // MARK: commands

    /// `SET key value`; throws unless the reply is `+OK`.
    func set(key: [UInt8], value: UnsafeRawBufferPointer) throws {
        let header = Array("*3\r\n$3\r\nSET\r\n$\(key.count)\r\n".utf8) + key + Array("\r\n$\(value.count)\r\n".utf8)
        let trailer: [UInt8] = [13, 10]
        try header.withUnsafeBytes { h in
            try trailer.withUnsafeBytes { t in try sendAll([h, value, t]) }
        }
        let reply = try readValue()
        guard reply == .simple("OK") else { throw ToolError("redis SET answered \(reply)") }
    }

    /// `GET key` into `destination`; returns the value's length (-1 when the key is missing).
    /// Throws when the value does not fit.
    func get(key: [UInt8], into destination: UnsafeMutableRawBufferPointer) throws -> Int {
        let request = Array("*2\r\n$3\r\nGET\r\n$\(key.count)\r\n".utf8) + key + [13, 10]
        try request.withUnsafeBytes { try sendAll([$0]) }
        let line = try readLine()
        guard let kind = line.first else { throw ToolError("redis sent an empty line") }
        switch kind {
        case UInt8(ascii: "$"):
            guard let length = Int(String(decoding: line.dropFirst(), as: UTF8.self)) else { throw ToolError("bad bulk length from redis") }
            if length < 0 { return -1 }
            guard length <= destination.count else { throw ToolError("redis value of \(length) bytes does not fit \(destination.count)") }
            try readExactly(into: UnsafeMutableRawBufferPointer(rebasing: destination[0..<length]))
            let crlf = try readLine()
            guard crlf.isEmpty else { throw ToolError("redis bulk value not followed by CRLF") }
            return length
        case UInt8(ascii: "-"):
            throw ToolError("redis GET: \(String(decoding: line.dropFirst(), as: UTF8.self))")
        default:
            throw ToolError("redis GET answered an unexpected type '\(Character(UnicodeScalar(kind)))'")
        }
    }

    /// `MSET key value …` with one gathered write: the multi-page put `--pages-per-get` compares.
    func mset(keys: [[UInt8]], values: [UnsafeRawBufferPointer]) throws {
        precondition(keys.count == values.count && !keys.isEmpty)
        // All the framing in one array, the values in between as their own vectors: no copy.
        var framing = Array("*\(1 + 2 * keys.count)\r\n$4\r\nMSET\r\n".utf8)
        var cuts: [Range<Int>] = [0..<framing.count]
        for (key, value) in zip(keys, values) {
            let start = framing.count
            framing += Array("$\(key.count)\r\n".utf8) + key + Array("\r\n$\(value.count)\r\n".utf8)
            cuts.append(start..<framing.count)
            framing += [13, 10]
            cuts.append(framing.count - 2..<framing.count)
        }
        try framing.withUnsafeBytes { raw in
            var parts = [UnsafeRawBufferPointer(rebasing: raw[cuts[0]])]
            for (index, value) in values.enumerated() {
                parts += [UnsafeRawBufferPointer(rebasing: raw[cuts[1 + 2 * index]]), value, UnsafeRawBufferPointer(rebasing: raw[cuts[2 + 2 * index]])]
            }
            try sendAll(parts)
        }
        let reply = try readValue()
        guard reply == .simple("OK") else { throw ToolError("redis MSET answered \(reply)") }
    }

    /// `MGET key …`, the values received one after another straight into `destination`, as a
    /// client fetching several pages at once would; returns each value's length (-1: missing).
    func mget(keys: [[UInt8]], into destination: UnsafeMutableRawBufferPointer) throws -> [Int] {
        var request = Array("*\(1 + keys.count)\r\n$4\r\nMGET\r\n".utf8)
        for key in keys { request += Array("$\(key.count)\r\n".utf8) + key + [13, 10] }
        try request.withUnsafeBytes { try sendAll([$0]) }
        let header = try readLine()
        guard header.first == UInt8(ascii: "*"), Int(String(decoding: header.dropFirst(), as: UTF8.self)) == keys.count else {
            throw ToolError("redis MGET answered '\(String(decoding: header, as: UTF8.self))'")
        }
        var lengths: [Int] = []
        var at = 0
        for _ in keys {
            let line = try readLine()
            guard line.first == UInt8(ascii: "$"), let length = Int(String(decoding: line.dropFirst(), as: UTF8.self)) else {
                throw ToolError("redis MGET sent a value that is not a bulk string")
            }
            lengths.append(length)
            guard length >= 0 else { continue }
            guard at + length <= destination.count else { throw ToolError("redis MGET values do not fit \(destination.count) bytes") }
            try readExactly(into: UnsafeMutableRawBufferPointer(rebasing: destination[at..<at + length]))
            guard try readLine().isEmpty else { throw ToolError("redis bulk value not followed by CRLF") }
            at += length
        }
        return lengths
    }

    /// Any command with small arguments and a simple reply (PING, INFO, CONFIG SET…).
    func command(_ arguments: [String]) throws -> Value {
        var request = Array("*\(arguments.count)\r\n".utf8)
        for argument in arguments {
            let bytes = Array(argument.utf8)
            request += Array("$\(bytes.count)\r\n".utf8) + bytes + [13, 10]
        }
        try request.withUnsafeBytes { try sendAll([$0]) }
        return try readValue()
    }

    // MARK: wire

    private func readValue() throws -> Value {
        let line = try readLine()
        guard let kind = line.first else { throw ToolError("redis sent an empty line") }
        let rest = String(decoding: line.dropFirst(), as: UTF8.self)
        switch kind {
        case UInt8(ascii: "+"): return .simple(rest)
        case UInt8(ascii: "-"): return .error(rest)
        case UInt8(ascii: ":"):
            guard let value = Int(rest) else { throw ToolError("bad integer from redis: \(rest)") }
            return .integer(value)
        case UInt8(ascii: "$"):
            guard let length = Int(rest) else { throw ToolError("bad bulk length from redis: \(rest)") }
            if length < 0 { return .bulk(nil) }
            var bytes = [UInt8](repeating: 0, count: length)
            try bytes.withUnsafeMutableBytes { try readExactly(into: $0) }
            guard try readLine().isEmpty else { throw ToolError("redis bulk value not followed by CRLF") }
            return .bulk(bytes)
        default:
            throw ToolError("unsupported redis reply type '\(Character(UnicodeScalar(kind)))'")
        }
    }

    /// One CRLF-terminated line, without the CRLF.
    private func readLine() throws -> [UInt8] {
        var line: [UInt8] = []
        while true {
            if head < tail {
                let window = UnsafeRawBufferPointer(rebasing: buffer[head..<tail])
                if let at = window.firstIndex(of: 10) {
                    line += window[0..<at]
                    head += at + 1
                    guard line.last == 13 else { throw ToolError("redis line not ended by CRLF") }
                    line.removeLast()
                    return line
                }
                line += window
                head = tail
            }
            try fill()
        }
    }

    /// Fills `destination` from what is buffered, then straight from the socket.
    private func readExactly(into destination: UnsafeMutableRawBufferPointer) throws {
        var at = min(tail - head, destination.count)
        if at > 0 {
            UnsafeMutableRawBufferPointer(rebasing: destination[0..<at]).copyMemory(from: UnsafeRawBufferPointer(rebasing: buffer[head..<head + at]))
            head += at
        }
        while at < destination.count {
            let n = recv(fd, destination.baseAddress! + at, destination.count - at, 0)
            if n < 0 {
                if errno == EINTR { continue }
                throw ToolError("recv from redis: errno \(errno)")
            }
            guard n > 0 else { throw ToolError("redis closed the connection") }
            at += n
        }
    }

    private func fill() throws {
        head = 0
        tail = 0
        while true {
            let n = recv(fd, buffer.baseAddress!, buffer.count, 0)
            if n < 0 {
                if errno == EINTR { continue }
                throw ToolError("recv from redis: errno \(errno)")
            }
            guard n > 0 else { throw ToolError("redis closed the connection") }
            tail = n
            return
        }
    }

    private func sendAll(_ parts: [UnsafeRawBufferPointer]) throws {
        var vectors = parts.filter { $0.count > 0 }.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress!), iov_len: $0.count) }
        var first = 0
        while first < vectors.count {
            let n = vectors[first...].withUnsafeMutableBufferPointer { v -> Int in
                var message = msghdr()
                message.msg_iov = v.baseAddress
                message.msg_iovlen = v.count
                return sendmsg(fd, &message, Int32(MSG_NOSIGNAL))
            }
            if n < 0 {
                if errno == EINTR { continue }
                throw ToolError("send to redis: errno \(errno)")
            }
            var left = n
            while first < vectors.count && left >= vectors[first].iov_len {
                left -= vectors[first].iov_len
                first += 1
            }
            if left > 0 {
                vectors[first].iov_base += left
                vectors[first].iov_len -= left
            }
        }
    }
}
