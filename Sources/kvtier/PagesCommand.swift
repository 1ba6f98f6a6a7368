import ArgumentParser
import KVTierClient
import KVTierCodec
import KVTierCore
import KVTierProtocol

/// A page as the daemon mode of `kvtier pages` prints it (and its `--json` form).
struct PageView: Encodable {
    var key: String
    var modelID: String
    var model: String?
    var tokens: Int
    /// `ram`, `disk` or `ram+disk`.
    var tiers: String
    /// `none`, `session` (some session runs through it) or `pinned` (a pinned session does).
    var hold: String
    var leases: Int
    var heat: Float
    /// The codec of the disk copy; nil when the page is only in RAM.
    var codec: String?
    var rawBytes: Int
    var storedBytes: Int
    /// rawBytes / storedBytes; nil without a disk copy.
    var ratio: Double?
    var idleSeconds: Double

    init(_ page: PageInfo, models: ModelDirectory) {
        key = page.key.description
        modelID = modelHex(page.modelID)
        model = models.name(page.modelID)
        tokens = Int(page.tokens)
        tiers = [page.tiers.contains(.ram) ? "ram" : nil, page.tiers.contains(.disk) ? "disk" : nil].compactMap { $0 }.joined(separator: "+")
        hold = ["none", "session", "pinned"][Int(min(page.hold, 2))]
        leases = Int(page.leases)
        heat = page.heat
        if page.tiers.contains(.disk) {
            codec = (try? Codec(tag: page.codecTag))?.name ?? "tag 0x\(String(page.codecTag, radix: 16))"
        }
        rawBytes = Int(page.rawBytes)
        storedBytes = Int(page.storedBytes)
        ratio = page.storedBytes > 0 ? Double(page.rawBytes) / Double(page.storedBytes) : nil
        idleSeconds = Double(page.idleMicros) / 1e6
    }

    static let header = ["KEY", "MODEL", "TOKENS", "TIERS", "HOLD", "LEASES", "HEAT", "CODEC", "RATIO", "IDLE"]
    var row: [String] {
        [key, model ?? modelID, "\(tokens)", tiers, hold == "none" ? "—" : hold, "\(leases)", formatDecimal(Double(heat), places: 2),
         codec ?? "—", ratio.map { formatDecimal($0, places: 2) + "×" } ?? "—", formatAge(micros: UInt64(idleSeconds * 1e6))]
    }
}

/// `kvtier pages [DIR]`: the pages of a running daemon, or of a disk store read offline.
struct PagesCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pages",
        abstract: "List cached pages: a running kvtierd's (tier, hold, heat, codec, ratio) or a disk store's (read offline, checksums verified).",
        discussion: """
            Without DIR: asks the running daemon (PAGES) for this tenant's pages, RAM pages hottest \
            first, then pages only on disk, most recently used first. Reports tier (ram, disk, \
            ram+disk), hold (a session's or a pinned session's), leases, heat, the disk codec, the \
            compression ratio (16-bit KV bytes / stored bytes) and time since last use. Checksums \
            are not read in this mode. JSON: {"total": N, "pages": [...]}.

            With DIR: reads the store folder (or the state directory containing store/) offline, \
            verifying every record's checksum as 'kvtier verify' does; damaged records are not \
            listed, and a warning on stderr counts them. Safe while the daemon runs. JSON: an array.
            """
    )

    @Argument(help: "Read this store folder offline instead of asking the daemon.") var directory: String?
    @OptionGroup var connection: DaemonConnectionOptions
    @Option(help: "Daemon mode: only this model's pages (hex id as 'kvtier pages' prints it).") var modelID: ModelIDArgument?
    @Option(help: "Daemon mode: list at most this many pages.") var limit: Int?
    @Flag(help: "Print JSON instead of a table.") var json = false

    func validate() throws {
        if directory != nil, modelID != nil || limit != nil || connection.socket != nil {
            throw ValidationError("--model-id, --limit and --socket apply when asking the daemon; drop DIR to use them")
        }
        if let limit, limit < 1 { throw ValidationError("--limit must be at least 1") }
    }

    func run() async throws {
        if let directory { return try OfflinePages.run(directory: directory, json: json) }
        try await connection.withClient { client in
            let models = try await ModelDirectory(client)
            let (total, pages) = try await client.pages(modelID: modelID?.value, limit: limit ?? .max)
            let views = pages.map { PageView($0, models: models) }
            // The policy's decision for the models listed: what new pages of each are written with.
            let listed = Set(views.map(\.modelID))
            let codecs = try await CodecChoiceView.fetch(client, models: models).filter { listed.contains($0.modelID) }
            if json {
                struct Listing: Encodable { var total: Int; var pages: [PageView]; var codecs: [CodecChoiceView] }
                return try printJSON(Listing(total: total, pages: views, codecs: codecs))
            }
            guard !views.isEmpty else { return print("no pages" + (modelID.map { " of model \(modelHex($0.value))" } ?? "")) }
            printTable(PageView.header, views.map(\.row))
            print("")
            print("\(views.count) of \(total) pages" + (views.count < total ? " (--limit)" : ""))
            for codec in codecs {
                print("\(codec.model ?? codec.modelID): new pages are written with \(codec.codec) (codec policy \(codec.policy): \(codec.message))")
            }
        }
    }
}
