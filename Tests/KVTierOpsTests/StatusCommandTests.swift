@preconcurrency import Glibc
import Foundation
import KVTierClient
import KVTierCore
import Testing

/// `kvtier status` and `kvtier top` against a real kvtierd, before and after a PUT.
@Suite(.serialized, .enabled(if: Checkout.binariesBuilt, Checkout.missingBinaries))
struct StatusCommandTests {
    static let spec = ModelSpecification(name: "status-test", layers: 2, kvHeads: 2, headDim: 32, elementType: .float16,
                                         pageTokens: 16, ropeTheta: 10_000)

    static func statusJSON(socket: String) throws -> [String: Any] {
        let result = try runToCompletion([Checkout.cli!, "status", "--socket", socket, "--json"])
        #expect(result.code == 0, "\(result.output)")
        guard let object = try JSONSerialization.jsonObject(with: Data(result.output.utf8)) as? [String: Any] else {
            throw TestFailure("kvtier status --json printed no object:\n\(result.output)")
        }
        return object
    }

    /// A client with the test model registered and `count` random tokens with their KV.
    struct Writer {
        let client: KVTierClient
        let model: RegisteredModel
        let tokens: [UInt32]
        let keys: [UInt16]
        let values: [UInt16]

        init(socket: String, tokens count: Int) async throws {
            var random = SplitMix64(seed: 42)
            client = try await KVTierClient.connect(socketPath: socket)
            model = try await client.registerModel(StatusCommandTests.spec)
            tokens = (0..<count).map { _ in UInt32.random(in: 0..<128_000, using: &random) }
            let elements = StatusCommandTests.spec.shape.elements(tokens: count)
            keys = (0..<elements).map { _ in UInt16.random(in: 0...0x7BFF, using: &random) }
            values = (0..<elements).map { _ in UInt16.random(in: 0...0x7BFF, using: &random) }
        }

        func put() async throws {
            #expect(try await client.put(model, tokens: tokens, keys: keys, values: values) == tokens.count)
        }
    }

    static func put(socket: String, tokens count: Int) async throws {
        let writer = try await Writer(socket: socket, tokens: count)
        try await writer.put()
        await writer.client.close()
    }

    @Test func statusReportsTiersAndSessions() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let daemon = try await startDaemon(in: folder, ["--disk-budget", "256MiB"])
        defer { daemon.stop() }
        let socket = folder.path + "/s.sock"

        let before = try Self.statusJSON(socket: socket)
        #expect((before["tiers"] as? [String: [String: Any]])?["disk"]?["budgetBytes"] as? Int == 256 << 20, "the daemon's --disk-budget 256MiB")
        #expect(before["sessions"] as? Int == 0)
        let tiersBefore = before["tiers"] as? [String: [String: Any]]
        #expect(tiersBefore?["ram"]?["pages"] as? Int == 0)
        #expect(tiersBefore?["ram"]?["budgetBytes"] as? Int == 64 << 20, "the daemon's --ram-budget 64MiB")
        #expect(tiersBefore?["disk"] != nil)

        try await Self.put(socket: socket, tokens: 48)  // 3 pages of 16 tokens

        let after = try Self.statusJSON(socket: socket)
        let tiers = after["tiers"] as? [String: [String: Any]]
        #expect(tiers?["ram"]?["pages"] as? Int == 3, "\(after)")
        #expect((tiers?["ram"]?["bytes"] as? Int ?? 0) > 0)
        #expect((after["counters"] as? [String: Any])?["puts"] as? Int == 1)

        let table = try runToCompletion([Checkout.cli!, "status", "--socket", socket])
        #expect(table.code == 0, "\(table.output)")
        let ramRow = table.output.split(separator: "\n").first { $0.hasPrefix("ram ") }.map(String.init) ?? ""
        #expect(ramRow.split(separator: " ").dropFirst().first == "3", "ram row: \(ramRow)\n\(table.output)")
        #expect(table.output.contains("64MiB"), "budget shown:\n\(table.output)")
        #expect(table.output.contains("sessions"))
    }

    /// An ATTENTION report on disk pages starts a prefetch; status shows issued, loaded, used
    /// (and the ratio), late and wasted.
    @Test func statusReportsPrefetch() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let daemon = try await startDaemon(in: folder, [])
        defer { daemon.stop() }
        let socket = folder.path + "/s.sock"
        let writer = try await Writer(socket: socket, tokens: 48)  // 3 pages of 16 tokens
        try await writer.put()
        _ = try await writer.client.evict(writer.model, tokens: writer.tokens)
        try await writer.client.reportAttention(writer.model, tokens: writer.tokens, pageMass: [0, 0.5, 0.2])
        await writer.client.close()
        let status = try Self.statusJSON(socket: socket)
        let prefetch = status["prefetch"] as? [String: Any]
        #expect(prefetch?["issued"] as? Int == 2, "\(status)")
        #expect(prefetch?["used"] as? Int == 0 && prefetch?["accuracy"] as? Double == 0)
        let table = try runToCompletion([Checkout.cli!, "status", "--socket", socket])
        let row = table.output.split(separator: "\n").first { $0.hasPrefix("prefetch ") }.map(String.init) ?? ""
        #expect(row.contains("issued 2,") && row.contains("used 0 (0.0%, 0 late), wasted 0"), "prefetch row: \(row)\n\(table.output)")
    }

    /// A VRAM pool registered, a prefix placed and leased: status shows the directory's row.
    @Test func statusReportsTheVramDirectory() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let daemon = try await startDaemon(in: folder, [])
        defer { daemon.stop() }
        let socket = folder.path + "/s.sock"
        let writer = try await Writer(socket: socket, tokens: 48)  // 3 pages of 16 tokens
        try await writer.put()
        let before = try runToCompletion([Checkout.cli!, "status", "--socket", socket])
        #expect(!before.output.contains("\nvram "), "no row before any pool:\n\(before.output)")
        let pageBytes = Int(Self.spec.pageTokens) * Self.spec.shape.elements(tokens: 1) * 4
        let pool = try await writer.client.vramRegisterPool(deviceUUID: "GPU-status", slots: 8, slotBytes: pageBytes, handle: [1, 2, 3])
        let placed = try await writer.client.vramPlace(writer.model, poolID: pool, tokens: writer.tokens)
        try await writer.client.vramCommit(leaseID: placed.leaseID)
        let lent = try await writer.client.vramLease(writer.model, tokens: writer.tokens)
        #expect(lent.tokens == 48)
        let table = try runToCompletion([Checkout.cli!, "status", "--socket", socket])
        await writer.client.close()
        let row = table.output.split(separator: "\n").first { $0.hasPrefix("vram ") }.map(String.init) ?? ""
        #expect(row.contains("1 pools, 3 of 8 slots resident (0 being written), 1 leases; leases 1 hit / 0 missed, 0 evictions"),
                "vram row: \(row)\n\(table.output)")
    }

    @Test func statusFailsClearlyWithoutADaemon() throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let result = try runToCompletion([Checkout.cli!, "status", "--socket", folder.path + "/none.sock"])
        #expect(result.code == 1, "\(result.output)")
        #expect(result.output.contains("none.sock") && result.output.contains("--socket"), "\(result.output)")
    }

    /// `top` redraws `--iterations` frames; the second shows rates from the traffic in between.
    @Test func topRefreshesAndStops() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let daemon = try await startDaemon(in: folder)
        defer { daemon.stop() }
        let socket = folder.path + "/s.sock"
        // Connect and register first, so only the PUT itself falls between two frames.
        let writer = try await Writer(socket: socket, tokens: 32)
        let top = try ChildProcess([Checkout.cli!, "top", "--socket", socket, "--iterations", "3", "--interval", "1"],
                                   logPath: folder.path + "/top.out")
        #expect(top.waitForLog("refresh 1/3", seconds: 15), "no first frame:\n\(top.log)")
        try await writer.put()
        #expect(!top.log.contains("refresh 3/3"), "the PUT took longer than two frames; no frame can show it")
        let status = top.wait(seconds: 20)
        await writer.client.close()
        #expect(status.map(exitCode) == 0, "top: \(String(describing: status))\n\(top.log)")
        let frames = top.log.components(separatedBy: "kvtier top — ")
        #expect(frames.count == 4, "three frames:\n\(top.log)")
        #expect(top.log.contains("refresh 3/3"))
        // Frame 1 has no rates yet; a later one saw the PUT (1 per ~second, so a nonzero PUT/s).
        let rateRows = top.log.split(separator: "\n").enumerated().compactMap { index, line -> [Substring]? in
            line.hasPrefix("LOOKUP/s") ? top.log.split(separator: "\n")[index + 1].split(separator: " ") : nil
        }
        #expect(rateRows.count == 3)
        #expect(rateRows.first?.first == "-")
        #expect(rateRows.dropFirst().contains { $0.count > 1 && $0[1] != "0.0" && $0[1] != "-" }, "no frame shows the PUT:\n\(top.log)")
        let ramRows = top.log.split(separator: "\n").filter { $0.hasPrefix("ram ") }
        #expect(ramRows.last?.split(separator: " ").dropFirst().first == "2", "2 pages after the PUT:\n\(top.log)")
    }
}
