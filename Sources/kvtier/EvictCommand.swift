import ArgumentParser
import KVTierClient
import KVTierCore
import KVTierProtocol

/// `kvtier evict`: moves pages out of RAM now (EVICT), or deletes them.
struct EvictCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "evict",
        abstract: "Move pages out of RAM now (written to disk first), or delete them from both tiers with --delete.",
        discussion: """
            Choose the pages: the cached prefix of a session (--session NAME), of a token sequence \
            (--model-id HEX with --tokens or --tokens-file), or every page of this tenant (--all, \
            optionally of one model with --model-id). Pages leased by a client's GET and pages of a \
            pinned session are skipped and stay where they are: release the lease or unpin the \
            session ('kvtier sessions unpin NAME') first.

            """
    )

    @OptionGroup var connection: DaemonConnectionOptions
    @Option(help: "Evict the pages of this session.") var session: String?
    @Option(help: "The model (hex id): of --tokens / --tokens-file, or to limit --all.") var modelID: ModelIDArgument?
    @Option(help: "Evict the cached prefix of these token ids (commas or spaces).") var tokens: String?
    @Option(help: "A file of token ids: integers separated by commas or spaces, or a JSON array.") var tokensFile: String?
    @Flag(help: "Every page of this tenant (of --model-id only, when given).") var all = false
    @Flag(help: "Delete the pages from disk too (they are gone from the cache).") var delete = false
    @Flag(help: "Print JSON for scripts.") var json = false

    func validate() throws {
        let selections = [session != nil, tokens != nil || tokensFile != nil, all].filter { $0 }.count
        guard selections == 1, !(tokens != nil && tokensFile != nil) else {
            throw ValidationError("give exactly one of --session, --tokens (or --tokens-file) with --model-id, or --all")
        }
        if session != nil, modelID != nil { throw ValidationError("--model-id comes from the session; drop it with --session") }
        if tokens != nil || tokensFile != nil, modelID == nil { throw ValidationError("--tokens and --tokens-file need --model-id") }
    }

    struct Outcome: Encodable {
        var evicted: Int
        var deleted: Int
        var skipped: Int
    }

    func run() async throws {
        try await connection.withClient { client in
            let reply: EvictReply
            var what: String
            if all {
                if let modelID { _ = try await ModelDirectory(client).require(modelID.value) }
                reply = try await client.evictAll(modelID: modelID?.value, deleteFromDisk: delete)
                what = "every page" + (modelID.map { " of model \(modelHex($0.value))" } ?? "")
            } else if let session {
                reply = try await client.evictSession(session, deleteFromDisk: delete)
                what = "session '\(session)'"
            } else {
                let models = try await ModelDirectory(client)
                let sequence = try tokensFile.map(readTokensFile) ?? parseTokens(tokens!, source: "--tokens")
                what = "the cached prefix of \(sequence.count) tokens"
                reply = try await client.evict(try models.require(modelID!.value).registered, tokens: sequence, deleteFromDisk: delete)
            }
            let outcome = Outcome(evicted: Int(reply.evicted), deleted: Int(reply.deleted), skipped: Int(reply.skipped))
            if json { return try printJSON(outcome) }
            print("\(delete ? "evicted and deleted" : "evicted") \(what)")
            printTable(["PAGES", "COUNT"], [
                ["evicted (moved out of RAM)", "\(outcome.evicted)"],
                ["deleted (removed from disk)", "\(outcome.deleted)"],
                ["skipped", "\(outcome.skipped)"],
            ])
            if outcome.skipped > 0 {
                print("")
                print("Skipped pages are leased by a client's GET (they move once released) or held by a pinned session "
                      + "('kvtier sessions unpin NAME' first).")
            }
        }
    }
}
