import ArgumentParser
import KVTierClient
import KVTierCore
import KVTierProtocol

/// What `kvtier explain` found (its `--json` form).
struct MissExplanation: Encodable {
    struct Model: Encodable {
        var id: String
        var name: String
        var pageTokens: Int
    }

    /// The session of the same model whose tokens agree longest with the query.
    struct Closest: Encodable {
        var session: String
        var sessionTokens: Int
        /// Tokens both begin with.
        var commonPrefix: Int
        /// The first index where they differ, with both tokens; nil when one ends first.
        var firstDifference: Int?
        var queryToken: UInt32?
        var sessionToken: UInt32?
    }

    var model: Model
    var session: String?
    var queryTokens: Int
    var cachedTokens: Int
    var ramTokens: Int
    var diskTokens: Int
    var estimatedLoadMicros: UInt64
    var fullyCached: Bool
    /// The first page not (fully) served: index and token range; nil when fully cached.
    var firstUncachedPage: Int?
    var firstUncachedRange: [Int]?
    var sessionsCompared: Int
    var closest: Closest?
    /// The diagnosis in words, one sentence per item.
    var diagnosis: [String]
}

/// `kvtier explain`: why a token sequence misses the cache.
struct ExplainCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "explain",
        abstract: "Explain why a token sequence misses: the cached prefix, the first uncached page, and where it diverges from your sessions.",
        discussion: """
            Give the sequence as a session (--session NAME) or as a model id with tokens \
            (--model-id HEX with --tokens "1,2,3" or --tokens-file FILE holding integers or a JSON \
            array). Prints the model, the cached prefix with its RAM/disk split and estimated load \
            time (LOOKUP), and for the first page not served: its token range and the session of the \
            same model that shares the longest common prefix, with the first differing token.

            A page matches only when all its tokens, and all tokens before it, match. A sequence's \
            last page is stored at its exact length, and such a partial page matches only when the \
            query contains all of its tokens: a query ending inside it is served up to that page's \
            start.

            Comparing reads the tokens of every session of the same model (SESSION_TOKENS), which \
            counts as resuming them: it marks them used (their TTL restarts) and starts loading \
            their disk pages into RAM. Sessions of other models are not touched.
            """
    )

    @OptionGroup var connection: DaemonConnectionOptions
    @Option(help: "Explain this session's sequence.") var session: String?
    @Option(help: "The model of --tokens / --tokens-file (hex id, see 'kvtier pages').") var modelID: ModelIDArgument?
    @Option(help: "Token ids separated by commas or spaces.") var tokens: String?
    @Option(help: "A file of token ids: integers separated by commas or spaces, or a JSON array.") var tokensFile: String?
    @Flag(help: "Print JSON for scripts.") var json = false

    func validate() throws {
        let sources = [session != nil, tokens != nil, tokensFile != nil].filter { $0 }.count
        guard sources == 1 else { throw ValidationError("give exactly one of --session, --tokens or --tokens-file") }
        if session != nil, modelID != nil { throw ValidationError("--model-id comes from the session; drop it with --session") }
        if session == nil, modelID == nil { throw ValidationError("--tokens and --tokens-file need --model-id") }
    }

    func run() async throws {
        try await connection.withClient { client in
            let models = try await ModelDirectory(client)
            let query: [UInt32]
            let modelID: UInt64
            if let session {
                (modelID, query) = try await client.sessionTokens(session)
            } else {
                modelID = self.modelID!.value
                query = try tokensFile.map(readTokensFile) ?? parseTokens(tokens!, source: "--tokens")
            }
            let entry = try models.require(modelID)
            let report = try await Self.explain(client, model: entry.registered, query: query, session: session)
            if json { return try printJSON(report) }
            Self.printReport(report)
        }
    }

    static func explain(_ client: KVTierClient, model: RegisteredModel, query: [UInt32], session: String?) async throws -> MissExplanation {
        let found = try await client.lookup(model, tokens: query)
        let pageTokens = model.pageTokens
        var report = MissExplanation(
            model: .init(id: modelHex(model.modelID), name: model.specification.name, pageTokens: pageTokens), session: session,
            queryTokens: query.count, cachedTokens: found.cachedTokens, ramTokens: found.ramTokens, diskTokens: found.diskTokens,
            estimatedLoadMicros: found.estimatedLoadMicros, fullyCached: found.cachedTokens == query.count, sessionsCompared: 0,
            diagnosis: [])
        if report.fullyCached {
            report.diagnosis.append("All \(query.count) tokens are cached: a GET serves the whole sequence.")
            return report
        }
        let cached = found.cachedTokens
        let page = cached / pageTokens
        let pageStart = page * pageTokens
        let pageEnd = min(pageStart + pageTokens, query.count)
        report.firstUncachedPage = page
        report.firstUncachedRange = [pageStart, pageEnd]
        if cached > pageStart {
            report.diagnosis.append("Tokens \(pageStart)..<\(cached) of page \(page) are served from a shorter stored page (a sequence that ended there); "
                                    + "tokens \(cached)..<\(pageEnd) were never stored after it.")
        }

        // The tenant's other sessions of this model: only those are read, since reading counts as resuming.
        let candidates = try await client.sessionList().filter { $0.modelID == model.modelID && $0.name != session }
        report.sessionsCompared = candidates.count
        for candidate in candidates {
            guard let tokens = try? await client.sessionTokens(candidate.name).tokens else { continue }  // Deleted meanwhile.
            let common = zip(query, tokens).prefix { $0 == $1 }.count
            guard common > (report.closest?.commonPrefix ?? -1) else { continue }
            let differs = common < query.count && common < tokens.count
            report.closest = .init(session: candidate.name, sessionTokens: tokens.count, commonPrefix: common,
                                   firstDifference: differs ? common : nil, queryToken: differs ? query[common] : nil,
                                   sessionToken: differs ? tokens[common] : nil)
        }
        guard let closest = report.closest else {
            report.diagnosis.append(candidates.isEmpty
                ? "No other session of this model to compare with: tokens from \(cached) on were never stored, or their pages were evicted and deleted."
                : "No session of this model could be read.")
            return report
        }
        let name = "session '\(closest.session)' (\(closest.sessionTokens) tokens)"
        if let index = closest.firstDifference, let mine = closest.queryToken, let theirs = closest.sessionToken {
            let differing = index / pageTokens
            report.diagnosis.append("\(name) shares the first \(index) tokens; at token \(index) the query has \(mine) and the session has \(theirs).")
            report.diagnosis.append("So page \(differing) (tokens \(differing * pageTokens)..<\(min((differing + 1) * pageTokens, query.count))) and every page after it "
                                    + "miss: a page matches only when all its tokens, and all before it, match.")
        } else if closest.commonPrefix == closest.sessionTokens {
            report.diagnosis.append("\(name) is a prefix of the query: nothing beyond its \(closest.sessionTokens) tokens was stored "
                                    + "(put the longer sequence to cache the rest).")
        } else {
            report.diagnosis.append("The query is a prefix of \(name) and ends inside its page \(query.count / pageTokens): "
                                    + "a partial last page matches only when the query contains all of its tokens, so the query is served up to that page's start.")
        }
        let expected = closest.firstDifference ?? min(closest.commonPrefix, closest.sessionTokens)
        if expected / pageTokens * pageTokens > cached {
            report.diagnosis.append("The session agrees up to token \(expected) but only \(cached) are cached: its later pages are gone from both tiers "
                                    + "(deleted by 'kvtier evict --delete' or the disk budget).")
        }
        return report
    }

    static func printReport(_ r: MissExplanation) {
        let load = r.estimatedLoadMicros >= 1000 ? formatDecimal(Double(r.estimatedLoadMicros) / 1000, places: 1) + " ms" : "\(r.estimatedLoadMicros) µs"
        var rows = [
            ["model", "\(r.model.name) (\(r.model.id)), \(r.model.pageTokens) tokens per page"],
            ["sequence", (r.session.map { "session '\($0)', " } ?? "") + "\(r.queryTokens) tokens"],
            ["cached prefix", "\(r.cachedTokens) tokens (\(r.ramTokens) in RAM, \(r.diskTokens) on disk), estimated load \(load)"],
        ]
        if let page = r.firstUncachedPage, let range = r.firstUncachedRange {
            rows.append(["first uncached page", "\(page): tokens \(range[0])..<\(range[1])"])
        }
        if let c = r.closest {
            rows.append(["closest session", "'\(c.session)': \(c.commonPrefix) tokens in common of its \(c.sessionTokens)"])
        } else if !r.fullyCached {
            rows.append(["closest session", "none (\(r.sessionsCompared) compared)"])
        }
        printTable(["EXPLAIN", ""], rows)
        print("")
        for line in r.diagnosis { print(line) }
    }
}
