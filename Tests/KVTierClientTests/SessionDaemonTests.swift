@preconcurrency import Glibc
import KVTierClient
import KVTierCore
import KVTierProtocol
import Testing

/// Named sessions through a real kvtierd: a conversation survives a clean restart and a
/// SIGKILL, resumes at its exact token with exact bytes (lossless disk codec), and forks.
@Suite(.serialized, .enabled(if: DaemonProcess.binary != nil, DaemonProcess.skipReason))
struct SessionDaemonTests {
    typealias D = DaemonTests
    static let arguments = ["--disk-codec", "fp16+lz4"]

    /// GET of `tokens` returns every token, equal to `kv` (full sequence `[layers, n, heads, dim]`).
    static func expectServes(_ client: KVTierClient, _ model: RegisteredModel, _ tokens: [UInt32],
                             _ kv: (keys: [UInt16], values: [UInt16]), _ what: String) async throws {
        let got = try await client.get(model, tokens: tokens)
        #expect(got.tokens == tokens.count, "\(what): served \(got.tokens) of \(tokens.count)")
        #expect(got.keys == kv.keys && got.values == kv.values, "\(what): bytes differ")
    }

    /// The first `n` tokens of a full-sequence KV (layout `[layers, tokens, heads, dim]`).
    static func prefix(_ kv: (keys: [UInt16], values: [UInt16]), of total: Int, _ n: Int) -> (keys: [UInt16], values: [UInt16]) {
        let row = D.spec.shape.rowElements
        func cut(_ a: [UInt16]) -> [UInt16] {
            (0..<D.spec.layers).flatMap { layer in a[(layer * total * row)..<((layer * total + n) * row)] }
        }
        return (cut(kv.keys), cut(kv.values))
    }

    @Test func aConversationSurvivesRestartAndSIGKILL() async throws {
        let seed = testSeed("SessionDaemonTests.aConversationSurvivesRestartAndSIGKILL")
        var random = SplitMix64(seed: seed)
        let tokens = D.randomTokens(70, &random)
        let kv = D.randomKV(tokens: 70, &random)
        let turn1 = Self.prefix(kv, of: 70, 40)

        // Turn 1, then a clean stop.
        var daemon = try await DaemonProcess.start(arguments: Self.arguments)
        do {
            let client = try await KVTierClient.connect(socketPath: daemon.socketPath, clientName: "turn-1")
            let model = try await client.registerModel(D.spec)
            #expect(try await client.put(model, tokens: Array(tokens[0..<40]), keys: turn1.keys, values: turn1.values, session: "chat") == 40)
            let info = try await client.sessionInfo("chat")
            #expect(info.tokens == 40 && info.ramTokens == 40 && !info.pinned, "\(info)")
            await client.close()
        }
        daemon.stop(keepingFiles: true)

        // Turn 2 in a new daemon: resume at the exact token, extend, then SIGKILL.
        daemon = try await DaemonProcess.start(arguments: Self.arguments, reusing: daemon)
        do {
            let client = try await KVTierClient.connect(socketPath: daemon.socketPath, clientName: "turn-2")
            let model = try await client.registerModel(D.spec)
            #expect(try await client.sessionList().map(\.name) == ["chat"])
            let resumed = try await client.sessionTokens("chat")
            #expect(resumed.modelID == model.modelID && resumed.tokens == Array(tokens[0..<40]))
            try await Self.expectServes(client, model, resumed.tokens, turn1, "after a clean restart (seed \(seed))")
            #expect(try await client.put(model, tokens: tokens, keys: kv.keys, values: kv.values, session: "chat") == 70)
            await client.close()
        }
        daemon.crash()

        // Turn 3 after the SIGKILL: everything acknowledged is there.
        daemon = try await DaemonProcess.start(arguments: Self.arguments, reusing: daemon)
        defer { daemon.stop() }
        let client = try await KVTierClient.connect(socketPath: daemon.socketPath, clientName: "turn-3")
        let known = try await client.models()
        #expect(known.count == 1 && known.first?.registration.name == D.spec.name, "models survive restarts: \(known)")
        let model = try await client.registerModel(D.spec)
        #expect(known.first?.modelID == model.modelID)
        let resumed = try await client.sessionTokens("chat")
        #expect(resumed.tokens == tokens, "a session's tail shorter than a page survives too")
        try await Self.expectServes(client, model, tokens, kv, "after SIGKILL (seed \(seed))")

        // Fork, pin, TTL, delete.
        let fork = try await client.sessionFork("chat", to: "branch")
        #expect(fork.name == "branch" && fork.tokens == 70 && !fork.pinned)
        try await client.sessionPin("branch")
        try await client.sessionTTL("chat", seconds: 600)
        let list = try await client.sessionList()
        #expect(Set(list.map(\.name)) == ["chat", "branch"])
        #expect(list.first { $0.name == "branch" }?.pinned == true && list.first { $0.name == "chat" }?.ttlSeconds == 600)
        try await client.sessionDelete("chat")
        #expect(try await client.sessionList().map(\.name) == ["branch"])
        try await Self.expectServes(client, model, tokens, kv, "the fork after deleting the original (seed \(seed))")
        let status = try await client.status()
        #expect(status["sessions"] == 1, "\(status)")

        // Inspection and eviction: 5 pages (4 whole, a 6-token tail), on disk after the restart.
        var listed = try await client.pages()
        #expect(listed.total == 5 && listed.pages.allSatisfy { $0.tiers.contains(.disk) && $0.hold == 2 }, "\(listed)")
        #expect(listed.pages.map(\.tokens).sorted() == [6, 16, 16, 16, 16])
        let evicted = try await client.evictAll()
        #expect(evicted.skipped == 5, "the pinned fork's pages stay: \(evicted)")
        try await client.sessionPin("branch", pinned: false)
        #expect(try await client.evict(model, tokens: tokens).evicted == 5)
        listed = try await client.pages()
        #expect(listed.pages.allSatisfy { $0.tiers == .disk })
        await client.close()
    }

    @Test func sessionErrorsAreClearAndKeepTheConnection() async throws {
        let daemon = try await DaemonProcess.start()
        defer { daemon.stop() }
        let client = try await KVTierClient.connect(socketPath: daemon.socketPath)
        let model = try await client.registerModel(D.spec)
        var random = SplitMix64(seed: 5)
        let kv = D.randomKV(tokens: 20, &random)
        let tokens = D.randomTokens(20, &random)
        for (name, expected) in [("bad\u{7}name", WireError.invalidArgument), (String(repeating: "n", count: 256), .invalidArgument)] {
            do {
                _ = try await client.put(model, tokens: tokens, keys: kv.keys, values: kv.values, session: name)
                Issue.record("a put with session name \(name.debugDescription) succeeded")
            } catch let error as KVTierClientError {
                #expect(error.wireError == expected, "\(error)")
            }
        }
        _ = try await client.put(model, tokens: tokens, keys: kv.keys, values: kv.values, session: "ok")
        for attempt in [{ _ = try await client.sessionFork("ok", to: "ok") }, { _ = try await client.sessionFork("nope", to: "x") },
                        { try await client.sessionDelete("nope") }, { try await client.sessionPin("nope") }] as [() async throws -> Void] {
            do {
                try await attempt()
                Issue.record("a session operation on a missing or clashing name succeeded")
            } catch let error as KVTierClientError {
                #expect(error.wireError == .invalidArgument || error.wireError == .notFound, "\(error)")
            }
        }
        try await client.ping()
        await client.close()
    }
}

extension SessionDaemonTests {
    /// A clean stop writes RAM pages to disk: a restart serves pages that were never put durably.
    @Test func aCleanStopKeepsTheWholeCache() async throws {
        var random = SplitMix64(seed: 9)
        let tokens = D.randomTokens(50, &random)
        let kv = D.randomKV(tokens: 50, &random)
        var daemon = try await DaemonProcess.start(arguments: Self.arguments)
        do {
            let client = try await KVTierClient.connect(socketPath: daemon.socketPath)
            let model = try await client.registerModel(D.spec)
            #expect(try await client.put(model, tokens: tokens, keys: kv.keys, values: kv.values) == 50)
            #expect(try await client.lookup(model, tokens: tokens).diskTokens == 0, "not durable: RAM only so far")
            await client.close()
        }
        daemon.stop(keepingFiles: true)
        daemon = try await DaemonProcess.start(arguments: Self.arguments, reusing: daemon)
        defer { daemon.stop() }
        let client = try await KVTierClient.connect(socketPath: daemon.socketPath)
        let model = try await client.registerModel(D.spec)
        #expect(try await client.lookup(model, tokens: tokens).diskTokens == 50)
        try await Self.expectServes(client, model, tokens, kv, "after a clean restart")
        await client.close()
    }
}
