@preconcurrency import Glibc
import Foundation
import KVTierClient
import KVTierCore
import Testing

/// `kvtier sessions`, `pages`, `explain`, `evict`, `export` and `import` against a real kvtierd
/// (fp16 on disk, so every tier gives the bytes back exactly).
@Suite(.serialized, .enabled(if: Checkout.binariesBuilt, Checkout.missingBinaries))
struct CacheCommandTests {
    static let spec = ModelSpecification(name: "cache-test", layers: 2, kvHeads: 2, headDim: 32, elementType: .float16,
                                         pageTokens: 16, ropeTheta: 10_000)

    /// A daemon in a fresh folder with a client that has the test model registered.
    struct Fixture {
        let folder: TemporaryFolder
        let daemon: ChildProcess
        let client: KVTierClient
        let model: RegisteredModel
        var socket: String { folder.path + "/s.sock" }
        var modelHex: String { PageKey.hex(model.modelID) }

        init() async throws {
            folder = try TemporaryFolder("kvtier-cli")
            daemon = try await startDaemon(in: folder, ["--disk-codec", "fp16"])
            client = try await KVTierClient.connect(socketPath: folder.path + "/s.sock")
            model = try await client.registerModel(CacheCommandTests.spec)
        }

        /// Runs `body` with a fresh fixture, closed afterwards whether it returns or throws.
        static func with(_ body: (Fixture) async throws -> Void) async throws {
            let fixture = try await Fixture()
            do { try await body(fixture) } catch {
                await fixture.close()
                throw error
            }
            await fixture.close()
        }

        func close() async {
            await client.close()
            daemon.stop()
            folder.remove()
        }

        /// Random tokens and finite fp16 KV for them (from `seed`).
        func sequence(_ count: Int, seed: UInt64) -> (tokens: [UInt32], keys: [UInt16], values: [UInt16]) {
            var random = SplitMix64(seed: seed)
            let elements = CacheCommandTests.spec.shape.elements(tokens: count)
            return ((0..<count).map { _ in UInt32.random(in: 0..<128_000, using: &random) },
                    (0..<elements).map { _ in UInt16.random(in: 0...0x7BFF, using: &random) },
                    (0..<elements).map { _ in UInt16.random(in: 0...0x7BFF, using: &random) })
        }

        /// Puts a sequence (as a session when named); returns it.
        @discardableResult
        func put(_ count: Int, seed: UInt64, session: String? = nil) async throws -> (tokens: [UInt32], keys: [UInt16], values: [UInt16]) {
            let s = sequence(count, seed: seed)
            #expect(try await client.put(model, tokens: s.tokens, keys: s.keys, values: s.values, session: session) == count)
            return s
        }

        /// Runs `kvtier ARGS --socket S`.
        func cli(_ arguments: [String]) throws -> (code: Int32, output: String) {
            try runToCompletion([Checkout.cli!] + arguments + ["--socket", socket])
        }

        /// Runs `kvtier ARGS --socket S --json`, expecting success and one JSON document.
        func json(_ arguments: [String]) throws -> Any {
            let result = try cli(arguments + ["--json"])
            #expect(result.code == 0, "kvtier \(arguments): \(result.output)")
            guard let value = try? JSONSerialization.jsonObject(with: Data(result.output.utf8)) else {
                throw TestFailure("kvtier \(arguments.joined(separator: " ")) --json printed no JSON:\n\(result.output)")
            }
            return value
        }

        func object(_ arguments: [String]) throws -> [String: Any] {
            guard let object = try json(arguments) as? [String: Any] else { throw TestFailure("kvtier \(arguments): not an object") }
            return object
        }
    }

    @Test func sessionsListShowPinTTLForkDelete() async throws {
        try await Fixture.with { f in
            try await f.put(40, seed: 1, session: "chat")

            let listed = try f.json(["sessions"]) as? [[String: Any]] ?? []
            #expect(listed.count == 1)
            #expect(listed.first?["name"] as? String == "chat")
            #expect(listed.first?["tokens"] as? Int == 40)
            #expect(listed.first?["model"] as? String == "cache-test")
            #expect(listed.first?["modelID"] as? String == f.modelHex)

            var shown = try f.object(["sessions", "show", "chat"])
            #expect(shown["pinned"] as? Bool == false)
            #expect(shown["ttlSeconds"] as? Int == 0)
            #expect((shown["ramTokens"] as? Int ?? 0) + (shown["diskTokens"] as? Int ?? 0) == 40, "\(shown)")

            #expect(try f.cli(["sessions", "pin", "chat"]).code == 0)
            #expect(try f.cli(["sessions", "ttl", "chat", "120"]).code == 0)
            shown = try f.object(["sessions", "show", "chat"])
            #expect(shown["pinned"] as? Bool == true)
            #expect(shown["ttlSeconds"] as? Int == 120)
            #expect(shown["ramTokens"] as? Int == 40, "a pinned session is in RAM: \(shown)")

            let fork = try f.object(["sessions", "fork", "chat", "chat-2"])
            #expect(fork["name"] as? String == "chat-2")
            #expect(fork["tokens"] as? Int == 40)
            #expect(fork["pinned"] as? Bool == false, "a fork is unpinned")
            #expect(fork["ttlSeconds"] as? Int == 120, "a fork keeps the TTL")
            #expect((try f.json(["sessions"]) as? [[String: Any]])?.count == 2)

            let table = try f.cli(["sessions"])
            #expect(table.code == 0)
            #expect(table.output.contains("chat-2") && table.output.contains("cache-test") && table.output.contains("LAST USED"), "\(table.output)")
            let detail = try f.cli(["sessions", "show", "chat"])
            #expect(detail.output.contains("cache-test (\(f.modelHex))") && detail.output.contains("120s"), "\(detail.output)")

            #expect(try f.object(["sessions", "unpin", "chat"])["pinned"] as? Bool == false)
            #expect(try f.cli(["sessions", "delete", "chat-2"]).code == 0)
            let names = (try f.json(["sessions"]) as? [[String: Any]])?.compactMap { $0["name"] as? String }
            #expect(names == ["chat"])
            let missing = try f.cli(["sessions", "show", "chat-2"])
            #expect(missing.code != 0)
            #expect(missing.output.contains("chat-2"), "\(missing.output)")
        }
    }

    @Test func pagesFromTheDaemonShowTiersAndHolds() async throws {
        try await Fixture.with { f in
            try await f.put(40, seed: 2, session: "doc")  // Pages of 16, 16 and 8 tokens, written to disk too.
            try await f.put(32, seed: 3)  // Two pages in RAM only, held by no session.

            let listing = try f.object(["pages"])
            let pages = listing["pages"] as? [[String: Any]] ?? []
            #expect(listing["total"] as? Int == 5)
            #expect(pages.count == 5)
            let held = pages.filter { $0["hold"] as? String == "session" }
            #expect(held.count == 3, "\(pages)")
            #expect(held.compactMap { $0["tokens"] as? Int }.sorted() == [8, 16, 16])
            #expect(held.allSatisfy { $0["tiers"] as? String == "ram+disk" && $0["codec"] as? String == "fp16" }, "\(held)")
            #expect(held.allSatisfy { ($0["ratio"] as? Double ?? 0) > 0.5 }, "fp16 stores about its raw size: \(held)")
            #expect(pages.allSatisfy { $0["modelID"] as? String == f.modelHex && $0["model"] as? String == "cache-test" })

            let limited = try f.object(["pages", "--model-id", f.modelHex, "--limit", "2"])
            #expect((limited["pages"] as? [Any])?.count == 2)
            #expect(limited["total"] as? Int == 5)
            #expect((try f.object(["pages", "--model-id", "0x1234"])["total"]) as? Int == 0)

            let table = try f.cli(["pages"])
            #expect(table.code == 0)
            #expect(table.output.contains("ram+disk") && table.output.contains("session") && table.output.contains("5 of 5 pages"), "\(table.output)")
            // With a directory: the same disk pages, read offline from the store's files.
            let stored = try runToCompletion([Checkout.cli!, "pages", f.folder.path + "/state", "--json"])
            #expect(stored.code == 0, "\(stored.output)")
            let storedKeys = (try? JSONSerialization.jsonObject(with: Data(stored.output.utf8)) as? [[String: Any]])?.compactMap { $0["key"] as? String }
            let diskKeys = pages.filter { ($0["tiers"] as? String ?? "").contains("disk") }.compactMap { $0["key"] as? String }
            #expect(diskKeys.count >= 3)
            #expect(storedKeys.map(Set.init) == Set(diskKeys), "offline listing:\n\(stored.output)")
            let offline = try runToCompletion([Checkout.cli!, "pages", f.folder.path + "/state", "--model-id", f.modelHex])
            #expect(offline.code != 0 && offline.output.contains("drop DIR"), "\(offline.output)")
        }
    }

    @Test func explainFindsTheDivergingToken() async throws {
        try await Fixture.with { f in
            let base = try await f.put(40, seed: 4, session: "base")
            var query = base.tokens
            query[20] &+= 1

            let report = try f.object(["explain", "--model-id", f.modelHex, "--tokens", query.map(String.init).joined(separator: ",")])
            #expect(report["cachedTokens"] as? Int == 16, "\(report)")
            #expect(report["fullyCached"] as? Bool == false)
            #expect(report["firstUncachedPage"] as? Int == 1)
            #expect(report["firstUncachedRange"] as? [Int] == [16, 32])
            let closest = report["closest"] as? [String: Any]
            #expect(closest?["session"] as? String == "base")
            #expect(closest?["commonPrefix"] as? Int == 20)
            #expect(closest?["firstDifference"] as? Int == 20)
            #expect(closest?["queryToken"] as? Int == Int(query[20]))
            #expect(closest?["sessionToken"] as? Int == Int(base.tokens[20]))

            // The same from a JSON array in a file, as a table.
            let file = try f.folder.write("tokens.json", "[" + query.map(String.init).joined(separator: ", ") + "]\n")
            let table = try f.cli(["explain", "--model-id", "0x" + f.modelHex, "--tokens-file", file])
            #expect(table.code == 0, "\(table.output)")
            #expect(table.output.contains("at token 20 the query has \(query[20]) and the session has \(base.tokens[20])"), "\(table.output)")
            #expect(table.output.contains("cache-test") && table.output.contains("16 tokens per page"))

            // A query ending inside the session's last page: served up to that page's start.
            let prefix = try f.object(["explain", "--model-id", f.modelHex, "--tokens", base.tokens[0..<36].map(String.init).joined(separator: " ")])
            #expect(prefix["cachedTokens"] as? Int == 32, "\(prefix)")
            #expect((prefix["diagnosis"] as? [String])?.contains { $0.contains("contains all of its tokens") } == true, "\(prefix)")

            #expect(try f.object(["explain", "--session", "base"])["fullyCached"] as? Bool == true)

            let unknown = try f.cli(["explain", "--model-id", "abc", "--tokens", "1,2"])
            #expect(unknown.code != 0)
            #expect(unknown.output.contains("not registered") && unknown.output.contains(f.modelHex), "lists the registered model: \(unknown.output)")
            let garbage = try f.cli(["explain", "--model-id", f.modelHex, "--tokens", "1,x"])
            #expect(garbage.code != 0 && garbage.output.contains("'x'"), "\(garbage.output)")
        }
    }

    @Test func evictMovesPagesToDiskAndSkipsPinned() async throws {
        try await Fixture.with { f in
            let s = try await f.put(40, seed: 5, session: "ev")
            #expect(try await f.client.lookup(f.model, tokens: s.tokens).ramTokens == 40)

            let evicted = try f.object(["evict", "--session", "ev"])
            #expect(evicted["evicted"] as? Int == 3, "\(evicted)")
            #expect(evicted["skipped"] as? Int == 0)
            let after = try await f.client.lookup(f.model, tokens: s.tokens)
            #expect(after.cachedTokens == 40 && after.ramTokens == 0 && after.diskTokens == 40, "\(after)")

            // A pinned session's pages stay, and the table says why.
            let pinned = try await f.put(32, seed: 6, session: "keep")
            try await f.client.sessionPin("keep")
            let table = try f.cli(["evict", "--all"])
            #expect(table.code == 0)
            #expect(table.output.contains("pinned session"), "\(table.output)")
            #expect(try await f.client.lookup(f.model, tokens: pinned.tokens).ramTokens == 32)

            // --delete removes a sequence from both tiers (these pages may not have reached disk yet).
            let gone = try await f.put(32, seed: 7)
            let deleted = try f.object(["evict", "--model-id", f.modelHex, "--tokens", gone.tokens.map(String.init).joined(separator: ","), "--delete"])
            #expect(deleted["evicted"] as? Int == 2, "\(deleted)")
            #expect(try await f.client.lookup(f.model, tokens: gone.tokens).cachedTokens == 0)

            let bad = try f.cli(["evict", "--all", "--session", "ev"])
            #expect(bad.code != 0 && bad.output.contains("exactly one"), "\(bad.output)")
        }
    }

    @Test func exportDeleteImportRestoresTheSessionExactly() async throws {
        try await Fixture.with { f in
            let s = try await f.put(40, seed: 8, session: "conv")
            try await f.client.sessionPin("conv")
            try await f.client.sessionTTL("conv", seconds: 300)
            let file = f.folder.path + "/conv.kvts"

            let exported = try f.object(["export", "conv", file])
            #expect(exported["tokens"] as? Int == 40)
            #expect(exported["kvBytes"] as? Int == 4 * Self.spec.shape.elements(tokens: 40))

            // Forget the session and its pages, so the import has to send every byte again.
            #expect(try f.cli(["sessions", "delete", "conv"]).code == 0)
            _ = try f.object(["evict", "--all", "--delete"])
            #expect(try await f.client.lookup(f.model, tokens: s.tokens).cachedTokens == 0)

            let imported = try f.cli(["import", file])
            #expect(imported.code == 0, "\(imported.output)")
            #expect(imported.output.contains("imported 'conv'") && imported.output.contains("40 tokens"), "\(imported.output)")
            let shown = try f.object(["sessions", "show", "conv"])
            #expect(shown["tokens"] as? Int == 40)
            #expect(shown["pinned"] as? Bool == true)
            #expect(shown["ttlSeconds"] as? Int == 300)
            let kv = try await f.client.get(f.model, tokens: s.tokens)
            #expect(kv.tokens == 40)
            #expect(kv.keys == s.keys && kv.values == s.values, "imported KV differs from what was put")

            // Importing over an existing session is refused; --as picks another name.
            let again = try f.cli(["import", file])
            #expect(again.code != 0 && again.output.contains("--as"), "\(again.output)")
            #expect(try f.object(["import", file, "--as", "conv-copy"])["session"] as? String == "conv-copy")
        }
    }

    /// An archive keeps its model's disk codec, so `kvtier import` on another daemon registers
    /// the same model id (and that daemon writes its pages with that codec, not its default).
    @Test func aModelsDiskCodecTravelsWithItsArchive() async throws {
        try await Fixture.with { f in
            var spec = Self.spec
            spec.diskCodec = "FP16+zstd(1)"  // not the canonical spelling: the daemon's is what counts
            let model = try await f.client.registerModel(spec)
            #expect(model.modelID != f.model.modelID)
            let s = f.sequence(40, seed: 10)
            #expect(try await f.client.put(model, tokens: s.tokens, keys: s.keys, values: s.values, session: "coded") == 40)
            let file = f.folder.path + "/coded.kvts"
            #expect(try f.cli(["export", "coded", file]).code == 0)
            try await Fixture.with { g in
                let imported = try g.cli(["import", file])
                #expect(imported.code == 0, "\(imported.output)")
                let listed = try await g.client.models().first { $0.modelID == model.modelID }
                #expect(listed?.registration.diskCodec == "fp16+zstd", "\(String(describing: listed))")
                #expect(try await g.client.evictAll(modelID: model.modelID).evicted == 3)
                let pages = try await g.client.pages(modelID: model.modelID).pages
                #expect(pages.count == 3 && pages.allSatisfy { $0.codecTag == 0x0001_0201 },
                        "written as fp16+zstd (tag 0x10201), not the daemon's fp16: \(pages.map { String($0.codecTag, radix: 16) })")
                let kv = try await g.client.get(RegisteredModel(modelID: model.modelID, specification: spec, pageTokens: 16), tokens: s.tokens)
                #expect(kv.keys == s.keys && kv.values == s.values)
            }
        }
    }

    @Test func aDamagedArchiveIsRefused() async throws {
        try await Fixture.with { f in
            try await f.put(24, seed: 9, session: "orig")
            let file = f.folder.path + "/orig.kvts"
            #expect(try f.cli(["export", "orig", file]).code == 0)

            var bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: file)))
            bytes[bytes.count / 2] ^= 0x40
            try Data(bytes).write(to: URL(fileURLWithPath: file))
            let result = try f.cli(["import", file, "--as", "restored"])
            #expect(result.code != 0)
            #expect(result.output.contains("damaged") && result.output.contains(file), "\(result.output)")
            #expect(try f.cli(["sessions", "show", "restored"]).code != 0, "nothing is imported from a damaged file")

            let missing = try f.cli(["import", f.folder.path + "/none.kvts"])
            #expect(missing.code != 0 && missing.output.contains("none.kvts"), "\(missing.output)")
            let session = try f.cli(["export", "nope", f.folder.path + "/x.kvts"])
            #expect(session.code != 0 && session.output.contains("nope"), "\(session.output)")
        }
    }
}
