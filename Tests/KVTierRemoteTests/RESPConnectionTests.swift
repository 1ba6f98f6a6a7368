@preconcurrency import Glibc
import KVTierRemote
import KVTierSystem
import SystemPackage
import Testing

/// RESPConnection against a peer that says whatever the test writes: a broken or hostile server
/// gets an error, in bounded time and memory, never a crash or a hang.
@Suite struct RESPConnectionTests {
    /// A connection reading what `server` sends, within `timeoutMillis`.
    static func pair(timeoutMillis: Int = 200) throws -> (RESPConnection, FileDescriptor) {
        let (ours, theirs) = try FileDescriptor.unixSocketPair()
        return (RESPConnection(descriptor: ours, timeoutMillis: timeoutMillis), theirs)
    }

    static func say(_ server: FileDescriptor, _ text: String) throws {
        try server.sendAll(Array(text.utf8))
    }

    @Test func repliesOfEveryKind() throws {
        let (connection, server) = try Self.pair()
        defer { server.closeIgnoringErrors() }
        try Self.say(server, "+OK\r\n-ERR nope\r\n:42\r\n$3\r\nabc\r\n$-1\r\n*2\r\n:1\r\n$0\r\n\r\n*-1\r\n")
        #expect(try connection.readReply() == .simple("OK"))
        #expect(try connection.readReply() == .error("ERR nope"))
        #expect(try connection.readReply() == .integer(42))
        #expect(try connection.readReply() == .bulk(Array("abc".utf8)))
        #expect(try connection.readReply() == .bulk(nil))
        #expect(try connection.readReply() == .array([.integer(1), .bulk([])]))
        #expect(try connection.readReply() == .array(nil))
    }

    @Test func requestsAreRESPArrays() throws {
        let (connection, server) = try Self.pair()
        defer { server.closeIgnoringErrors() }
        let value: [UInt8] = [0, 13, 10, 255]
        try value.withUnsafeBytes { raw in try connection.send([[.text("SET"), .text("k"), .bytes(raw)], [.text("PING")]]) }
        var received = [UInt8](repeating: 0, count: 256)
        let count = try received.withUnsafeMutableBytes { try server.receive(into: $0) }
        #expect(Array(received[0..<count]) == Array("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\n".utf8) + value + Array("\r\n*1\r\n$4\r\nPING\r\n".utf8))
    }

    @Test func valuesLandInTheCallersMemoryAndOversizedOnesAreSkipped() throws {
        let (connection, server) = try Self.pair()
        defer { server.closeIgnoringErrors() }
        let big = String(repeating: "x", count: 100_000)
        try Self.say(server, "*3\r\n$5\r\nhello\r\n$100000\r\n\(big)\r\n$-1\r\n")
        try connection.readArrayHeader(count: 3)
        var memory = [UInt8](repeating: 0, count: 16)
        let first = try memory.withUnsafeMutableBytes { raw in try connection.readBulk(maxBytes: 16) { _ in raw } }
        #expect(first == .value(5))
        #expect(Array(memory[0..<5]) == Array("hello".utf8))
        var asked = false
        // Over the limit: never asked for memory, read through and dropped.
        let second = try connection.readBulk(maxBytes: 16) { _ in asked = true; return nil }
        #expect(second == .skipped(100_000))
        #expect(!asked)
        #expect(try connection.readBulk(maxBytes: 16) { _ in nil } == .missing)
    }

    @Test func hostileRepliesAreProtocolViolations() throws {
        let cases: [(String, String)] = [
            ("$2000000\r\n", "bulk string"),                       // bigger than a small reply may be
            ("*100000000\r\n", "array"),                           // more elements than allowed
            ("*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n", "depth"),    // nested too deep
            (":12x\r\n", "integer"),
            ("?\r\n", "type byte"),
            ("+OK\n", "CRLF"),
            ("$3\r\nabcXY", "CRLF"),
            (String(repeating: "+", count: 70_000), "longer than"),  // a line that never ends
        ]
        for (bytes, expected) in cases {
            let (connection, server) = try Self.pair()
            defer { server.closeIgnoringErrors() }
            try Self.say(server, bytes)
            do {
                let reply = try connection.readReply()
                Issue.record("'\(bytes.prefix(20))' was accepted as \(reply)")
            } catch .protocolViolation(let why) {
                #expect(why.contains(expected), "'\(bytes.prefix(20))': \(why)")
            } catch {
                Issue.record("'\(bytes.prefix(20))': \(error)")
            }
        }
    }

    @Test func aClaimedHugeValueCostsNoMemoryAndTimesOut() throws {
        // A value of a terabyte announced and never sent: skipped (not allocated) until the
        // deadline, then an error.
        let (connection, server) = try Self.pair(timeoutMillis: 150)
        defer { server.closeIgnoringErrors() }
        try Self.say(server, "*1\r\n$1000000000000\r\nabc")
        try connection.readArrayHeader(count: 1)
        let started = Deadline(millisFromNow: 0)
        #expect(throws: RESPError.timedOut) { try connection.readBulk(maxBytes: 1 << 20) { _ in nil } }
        let waited = Int((Deadline(millisFromNow: 0).nanoseconds - started.nanoseconds) / 1_000_000)
        #expect(waited >= 100 && waited < 5_000, "waited \(waited) ms for a 150 ms timeout")
    }

    @Test func silenceAndHangUpEndTheExchange() throws {
        let (connection, server) = try Self.pair(timeoutMillis: 100)
        #expect(throws: RESPError.timedOut) { try connection.readReply() }
        connection.expire(inMillis: 1_000)
        try Self.say(server, "+PART")
        server.closeIgnoringErrors()
        #expect(throws: RESPError.closed) { try connection.readReply() }
    }

    @Test func errorRepliesAreThrownByTheTypedReaders() throws {
        let (connection, server) = try Self.pair()
        defer { server.closeIgnoringErrors() }
        try Self.say(server, "-OOM command not allowed\r\n-NOAUTH Authentication required.\r\n")
        #expect(throws: RESPError.server("OOM command not allowed")) { try connection.readOK() }
        #expect(throws: RESPError.server("NOAUTH Authentication required.")) { try connection.readArrayHeader(count: 2) }
    }
}
