@preconcurrency import Glibc
import KVTierSystem
import SystemPackage

/// Why a Redis exchange failed. Every case but `server` leaves the connection unusable: the
/// caller closes it (the stream may hold half a reply).
public enum RESPError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The server answered with an error reply (`-ERR …`, `-OOM …`, `-WRONGPASS …`).
    case server(String)
    /// No progress before the deadline.
    case timedOut
    /// The server closed the connection.
    case closed
    case system(Errno)
    /// Bytes that are not RESP2, or a reply over the limits the caller set: a broken or hostile
    /// server.
    case protocolViolation(String)
    case connect(String)

    public var description: String {
        switch self {
        case .server(let message): "redis answered an error: \(message)"
        case .timedOut: "redis did not answer in time"
        case .closed: "redis closed the connection"
        case .system(let errno): "redis connection: \(errno)"
        case .protocolViolation(let why): "redis sent something that is not a valid reply: \(why)"
        case .connect(let why): "cannot connect to redis: \(why)"
        }
    }
}

/// A reply of the small kind (`command`): bulk strings and arrays are bounded by the caller.
public enum RESPReply: Sendable, Equatable {
    case simple(String)
    case error(String)
    case integer(Int)
    case bulk([UInt8]?)
    case array([RESPReply]?)
}

/// One connection to Redis or Valkey speaking RESP2: the one RESP implementation of the
/// project (the remote tier's, and the Redis baseline of `kvtier bench serve` and
/// `kvtier bench remote`).
///
/// Requests go out in one gathered write (values are never copied into an output buffer);
/// values come in straight into the caller's memory. Nothing the server sends can make it
/// allocate without bound: a line is at most `maxLineBytes`, a bulk string at most what the
/// caller allows (a longer one is skipped, never buffered), an array at most the count the
/// caller expects. The socket is non-blocking, and every wait is a poll until `deadline`:
/// a server that stops answering costs at most the caller's timeout.
/// One thread at a time uses a connection.
public final class RESPConnection {
    /// The longest line (status, error, integer, length) read from the server.
    public static let maxLineBytes = 64 << 10
    /// The largest bulk string `command` accepts (INFO's reply is a few KiB).
    public static let maxSmallBulkBytes = 1 << 20
    /// The most elements of an array `command` accepts, and how deep arrays may nest.
    public static let maxSmallArrayCount = 1 << 16
    static let maxArrayDepth = 4
    static let bufferBytes = 256 << 10

    let descriptor: FileDescriptor
    /// Bytes received and not consumed yet: `buffer[head..<tail]`.
    private let buffer: UnsafeMutableRawBufferPointer
    private var head = 0
    private var tail = 0
    /// Where the exchange in progress gives up.
    public var deadline: Deadline

    /// Takes ownership of a connected stream socket (made non-blocking here).
    public init(descriptor: FileDescriptor, timeoutMillis: Int) {
        self.descriptor = descriptor
        _ = try? descriptor.addStatusFlags(O_NONBLOCK)
        buffer = .allocate(byteCount: Self.bufferBytes, alignment: 64)
        deadline = Deadline(millisFromNow: timeoutMillis)
    }

    /// Connects to `endpoint` within `timeoutMillis`.
    public static func connect(to endpoint: StreamEndpoint, timeoutMillis: Int) throws(RESPError) -> RESPConnection {
        do {
            return RESPConnection(descriptor: try FileDescriptor.connectStream(to: endpoint, timeoutMillis: timeoutMillis), timeoutMillis: timeoutMillis)
        } catch {
            throw .connect("\(endpoint): \(error)")
        }
    }

    deinit {
        descriptor.closeIgnoringErrors()
        buffer.deallocate()
    }

    /// Starts an exchange that must end within `millis`.
    public func expire(inMillis millis: Int) { deadline = Deadline(millisFromNow: millis) }

    // MARK: requests

    /// One argument of a command: text, or bytes sent as they are (not copied).
    public enum Argument {
        case text(String)
        case bytes(UnsafeRawBufferPointer)
    }

    /// Sends `commands` back to back in one gathered write (a pipeline); replies are read with
    /// `readReply` and friends, one per command, in order.
    public func send(_ commands: [[Argument]]) throws(RESPError) {
        var framing: [UInt8] = []
        var pieces: [(framing: Range<Int>, value: UnsafeRawBufferPointer?)] = []
        var start = 0
        for command in commands {
            framing += Array("*\(command.count)\r\n".utf8)
            for argument in command {
                switch argument {
                case .text(let text):
                    let bytes = Array(text.utf8)
                    framing += Array("$\(bytes.count)\r\n".utf8) + bytes + [13, 10]
                case .bytes(let value):
                    framing += Array("$\(value.count)\r\n".utf8)
                    pieces.append((start..<framing.count, value))
                    start = framing.count
                    framing += [13, 10]
                }
            }
        }
        pieces.append((start..<framing.count, nil))
        try lend(framing) { (raw) throws(RESPError) in
            var parts: [UnsafeRawBufferPointer] = []
            for piece in pieces {
                parts.append(UnsafeRawBufferPointer(rebasing: raw[piece.framing]))
                if let value = piece.value { parts.append(value) }
            }
            try sendAll(parts.filter { $0.count > 0 })
        }
    }

    /// A command of text arguments (PING, AUTH, SELECT, INFO, CONFIG …) and its reply, with bulk
    /// strings and arrays within the small limits. An error reply is returned, not thrown.
    public func command(_ arguments: [String]) throws(RESPError) -> RESPReply {
        try send([arguments.map { .text($0) }])
        return try readReply()
    }

    // MARK: replies

    /// The next reply, of any type, within the small limits.
    public func readReply() throws(RESPError) -> RESPReply {
        try readReply(depth: 0)
    }

    private func readReply(depth: Int) throws(RESPError) -> RESPReply {
        let (kind, rest) = try readHeader()
        switch kind {
        case UInt8(ascii: "+"): return .simple(rest)
        case UInt8(ascii: "-"): return .error(rest)
        case UInt8(ascii: ":"): return .integer(try Self.integer(rest))
        case UInt8(ascii: "$"):
            let length = try Self.integer(rest)
            guard length >= 0 else { return .bulk(nil) }
            guard length <= Self.maxSmallBulkBytes else { throw .protocolViolation("a bulk string of \(length) bytes where at most \(Self.maxSmallBulkBytes) are accepted") }
            var bytes = [UInt8](repeating: 0, count: length)
            try lendMutable(&bytes) { (raw) throws(RESPError) in try readExactly(into: raw) }
            try readCRLF()
            return .bulk(bytes)
        case UInt8(ascii: "*"):
            let count = try Self.integer(rest)
            guard count >= 0 else { return .array(nil) }
            guard count <= Self.maxSmallArrayCount, depth < Self.maxArrayDepth else {
                throw .protocolViolation("an array of \(count) elements at depth \(depth)")
            }
            var elements: [RESPReply] = []
            for _ in 0..<count { elements.append(try readReply(depth: depth + 1)) }
            return .array(elements)
        default:
            throw .protocolViolation("reply type byte \(kind)")
        }
    }

    /// A reply that must be `+OK` (or another simple string `expected`); an error reply is
    /// thrown as `server`.
    public func readOK(_ expected: String = "OK") throws(RESPError) {
        switch try readReply() {
        case .simple(let text) where text == expected: return
        case .error(let message): throw .server(message)
        case let other: throw .protocolViolation("expected +\(expected), got \(Self.summary(other))")
        }
    }

    /// A reply that must be an integer; an error reply is thrown as `server`.
    public func readInteger() throws(RESPError) -> Int {
        switch try readReply() {
        case .integer(let value): return value
        case .error(let message): throw .server(message)
        case let other: throw .protocolViolation("expected an integer, got \(Self.summary(other))")
        }
    }

    /// The header of an array reply of exactly `count` elements (MGET's); an error reply is
    /// thrown as `server`.
    public func readArrayHeader(count: Int) throws(RESPError) {
        let (kind, rest) = try readHeader()
        if kind == UInt8(ascii: "-") { throw .server(rest) }
        guard kind == UInt8(ascii: "*"), try Self.integer(rest) == count else {
            throw .protocolViolation("expected an array of \(count) elements")
        }
    }

    /// What `readBulk` found.
    public enum Bulk: Equatable, Sendable {
        /// A value of this many bytes, now in the destination.
        case value(Int)
        /// A nil bulk string: the key is missing.
        case missing
        /// A value of this many bytes that was over the limit, or for which the caller had no
        /// memory: read and dropped a buffer at a time, never held.
        case skipped(Int)
    }

    /// One bulk string, read into the memory `destination` gives for its length (asked only for
    /// lengths within `maxBytes`; it returns memory of at least that length, or nil to skip the
    /// value).
    public func readBulk(maxBytes: Int, into destination: (Int) -> UnsafeMutableRawBufferPointer?) throws(RESPError) -> Bulk {
        let (kind, rest) = try readHeader()
        if kind == UInt8(ascii: "-") { throw .server(rest) }
        guard kind == UInt8(ascii: "$") else { throw .protocolViolation("expected a bulk string, got type byte \(kind)") }
        let length = try Self.integer(rest)
        guard length >= 0 else { return .missing }
        guard length <= maxBytes, let target = destination(length) else {
            try skip(length)
            try readCRLF()
            return .skipped(length)
        }
        precondition(target.count >= length, "a bulk destination shorter than the value")
        try readExactly(into: UnsafeMutableRawBufferPointer(rebasing: target[0..<length]))
        try readCRLF()
        return .value(length)
    }

    /// `GET` of each key, pipelined with at most about `windowBytes` of values outstanding: the
    /// first alone, then as many as its size says fit the window (1…64). Each value is read
    /// into the memory `destination` gives for (its index, its length), as `readBulk` does.
    /// Why a window and not one pipeline (or one MGET) of all: Redis copies the replies of every
    /// command it has read into its output buffers before they drain, so 32 MiB of values asked
    /// for at once cost it 32 MiB of fresh buffers; a few MiB at a time reuse the same ones
    /// (docs/benchmarks.md, "Remote tier": 2.2–2.6 GB/s against 1.1–1.2 GB/s for fp16 pages).
    public func getEach(_ keys: [String], windowBytes: Int, maxBytes: Int,
                        into destination: (Int, Int) -> UnsafeMutableRawBufferPointer?) throws(RESPError) -> [Bulk] {
        var results: [Bulk] = []
        results.reserveCapacity(keys.count)
        var sent = 0
        var window = 1
        while results.count < keys.count {
            if sent < keys.count, sent - results.count < window {
                let end = min(keys.count, results.count + window)
                try send(keys[sent..<end].map { [.text("GET"), .text($0)] })
                sent = end
            }
            let index = results.count
            let bulk = try readBulk(maxBytes: maxBytes) { destination(index, $0) }
            results.append(bulk)
            if index == 0, case .value(let length) = bulk { window = min(64, max(1, windowBytes / max(1, length))) }
            if index == 0, case .missing = bulk { window = 64 }
        }
        return results
    }

    // MARK: conveniences (the benchmarks' Redis baseline)

    /// `SET key value`; throws unless the reply is `+OK`.
    public func set(key: [UInt8], value: UnsafeRawBufferPointer) throws(RESPError) {
        try lend(key) { (k) throws(RESPError) in try send([[.text("SET"), .bytes(k), .bytes(value)]]) }
        try readOK()
    }

    /// `GET key` into `destination`; returns the value's length (-1 when the key is missing).
    /// A value longer than `destination` is a protocol error here: the caller sized it.
    public func get(key: [UInt8], into destination: UnsafeMutableRawBufferPointer) throws(RESPError) -> Int {
        try lend(key) { (k) throws(RESPError) in try send([[.text("GET"), .bytes(k)]]) }
        switch try readBulk(maxBytes: destination.count, into: { _ in destination }) {
        case .value(let length): return length
        case .missing: return -1
        case .skipped(let length): throw .protocolViolation("a value of \(length) bytes where at most \(destination.count) fit")
        }
    }

    /// `MSET key value …`, values sent without a copy.
    public func mset(keys: [[UInt8]], values: [UnsafeRawBufferPointer]) throws(RESPError) {
        precondition(keys.count == values.count && !keys.isEmpty)
        let joined = keys.flatMap { $0 }
        try lend(joined) { (all) throws(RESPError) in
            var arguments: [Argument] = [.text("MSET")]
            var at = 0
            for (key, value) in zip(keys, values) {
                arguments.append(.bytes(UnsafeRawBufferPointer(rebasing: all[at..<at + key.count])))
                arguments.append(.bytes(value))
                at += key.count
            }
            try send([arguments])
        }
        try readOK()
    }

    /// `MGET key …`, the values received one after another into `destination`; each value's
    /// length (-1: missing). Values that do not fit what is left of `destination` are a
    /// protocol error here: the caller sized it.
    public func mget(keys: [[UInt8]], into destination: UnsafeMutableRawBufferPointer) throws(RESPError) -> [Int] {
        let joined = keys.flatMap { $0 }
        try lend(joined) { (all) throws(RESPError) in
            var arguments: [Argument] = [.text("MGET")]
            var at = 0
            for key in keys {
                arguments.append(.bytes(UnsafeRawBufferPointer(rebasing: all[at..<at + key.count])))
                at += key.count
            }
            try send([arguments])
        }
        try readArrayHeader(count: keys.count)
        var lengths: [Int] = []
        var at = 0
        for _ in keys {
            switch try readBulk(maxBytes: destination.count - at, into: { _ in UnsafeMutableRawBufferPointer(rebasing: destination[at...]) }) {
            case .value(let length):
                lengths.append(length)
                at += length
            case .missing: lengths.append(-1)
            case .skipped(let length): throw .protocolViolation("MGET values do not fit \(destination.count) bytes (one of \(length))")
            }
        }
        return lengths
    }

    // MARK: wire

    /// The type byte and the rest of the next line.
    private func readHeader() throws(RESPError) -> (UInt8, String) {
        let line = try readLine()
        guard let kind = line.first else { throw .protocolViolation("an empty line") }
        return (kind, String(decoding: line.dropFirst(), as: UTF8.self))
    }

    static func integer(_ text: String) throws(RESPError) -> Int {
        guard let value = Int(text) else { throw .protocolViolation("'\(text.prefix(32))' is not an integer") }
        return value
    }

    static func summary(_ reply: RESPReply) -> String {
        switch reply {
        case .simple(let text): "+\(text.prefix(64))"
        case .error(let text): "-\(text.prefix(64))"
        case .integer(let value): ":\(value)"
        case .bulk(let bytes): bytes.map { "a bulk string of \($0.count) bytes" } ?? "a nil bulk string"
        case .array(let elements): elements.map { "an array of \($0.count)" } ?? "a nil array"
        }
    }

    /// One CRLF-terminated line, without the CRLF, at most `maxLineBytes`.
    private func readLine() throws(RESPError) -> [UInt8] {
        var line: [UInt8] = []
        while true {
            if head < tail {
                let window = UnsafeRawBufferPointer(rebasing: buffer[head..<tail])
                if let at = window.firstIndex(of: 10) {
                    line += window[0..<at]
                    head += at + 1
                    guard line.last == 13 else { throw .protocolViolation("a line not ended by CRLF") }
                    line.removeLast()
                    return line
                }
                line += window
                head = tail
            }
            guard line.count <= Self.maxLineBytes else { throw .protocolViolation("a line longer than \(Self.maxLineBytes) bytes") }
            try fill()
        }
    }

    private func readCRLF() throws(RESPError) {
        var crlf: [UInt8] = [0, 0]
        try lendMutable(&crlf) { (raw) throws(RESPError) in try readExactly(into: raw) }
        guard crlf == [13, 10] else { throw .protocolViolation("a bulk string not followed by CRLF") }
    }

    /// Fills `destination` from what is buffered, then straight from the socket.
    private func readExactly(into destination: UnsafeMutableRawBufferPointer) throws(RESPError) {
        var at = min(tail - head, destination.count)
        if at > 0 {
            UnsafeMutableRawBufferPointer(rebasing: destination[0..<at]).copyMemory(from: UnsafeRawBufferPointer(rebasing: buffer[head..<head + at]))
            head += at
        }
        while at < destination.count {
            at += try receive(into: UnsafeMutableRawBufferPointer(rebasing: destination[at...]))
        }
    }

    /// Reads and drops `count` bytes (a value the caller did not want), a buffer at a time.
    private func skip(_ count: Int) throws(RESPError) {
        var left = count
        let buffered = min(tail - head, left)
        head += buffered
        left -= buffered
        while left > 0 {
            head = 0
            tail = try receive(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<min(buffer.count, left)]))
            left -= tail
            head = tail
        }
    }

    private func fill() throws(RESPError) {
        head = 0
        tail = 0
        tail = try receive(into: buffer)
    }

    /// One receive of at least one byte, waiting until the deadline.
    private func receive(into destination: UnsafeMutableRawBufferPointer) throws(RESPError) -> Int {
        while true {
            do {
                let count = try descriptor.receive(into: destination, wait: false)
                guard count > 0 else { throw RESPError.closed }
                return count
            } catch let error as RESPError {
                throw error
            } catch Errno.resourceTemporarilyUnavailable {
                try wait(for: Int16(POLLIN))
            } catch {
                throw .system(error as? Errno ?? .ioError)
            }
        }
    }

    private func sendAll(_ parts: [UnsafeRawBufferPointer]) throws(RESPError) {
        var parts = parts[...]
        while let first = parts.first {
            let sent: Int
            do {
                sent = try descriptor.sendGathered(parts)
            } catch .resourceTemporarilyUnavailable {
                try wait(for: Int16(POLLOUT))
                continue
            } catch {
                throw .system(error)
            }
            var left = sent
            while let part = parts.first, left >= part.count {
                left -= part.count
                parts = parts.dropFirst()
            }
            if left > 0, let part = parts.first {
                parts[parts.startIndex] = UnsafeRawBufferPointer(rebasing: part[left...])
            }
            _ = first
        }
    }

    private func wait(for events: Int16) throws(RESPError) {
        var entries = [pollfd(descriptor, events: events)]
        while true {
            if deadline.passed { throw .timedOut }
            do {
                if try Poll.wait(&entries, timeoutMillis: deadline.remainingMillis) > 0 { return }
            } catch {
                throw .system(error)
            }
        }
    }
}

/// `withUnsafeBytes` for a body with typed throws (the standard library's is `rethrows`, which
/// erases the error type).
func lend<R>(_ bytes: [UInt8], _ body: (UnsafeRawBufferPointer) throws(RESPError) -> R) throws(RESPError) -> R {
    let outcome = bytes.withUnsafeBytes { raw in Result { () throws(RESPError) in try body(raw) } }
    return try outcome.get()
}

/// `withUnsafeMutableBytes` for a body with typed throws.
func lendMutable<R>(_ bytes: inout [UInt8], _ body: (UnsafeMutableRawBufferPointer) throws(RESPError) -> R) throws(RESPError) -> R {
    let outcome = bytes.withUnsafeMutableBytes { raw in Result { () throws(RESPError) in try body(raw) } }
    return try outcome.get()
}
