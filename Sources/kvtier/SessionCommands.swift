import ArgumentParser
import KVTierClient
import KVTierCore
import KVTierProtocol

/// A session as `kvtier sessions` prints it (and its `--json` form).
struct SessionView: Encodable {
    var name: String
    var modelID: String
    /// The model's registered name; nil when the daemon does not list the model.
    var model: String?
    var tokens: Int
    var ramTokens: Int
    var diskTokens: Int
    var pinned: Bool
    /// 0: none.
    var ttlSeconds: Int
    var lastUsedMicros: UInt64
    var idleSeconds: Double

    init(_ info: KVTierSessionInfo, models: ModelDirectory, nowMicros: UInt64 = Clocks.wallMicros()) {
        name = info.name
        modelID = modelHex(info.modelID)
        model = models.name(info.modelID)
        tokens = Int(info.tokens)
        ramTokens = Int(info.ramTokens)
        diskTokens = Int(info.diskTokens)
        pinned = info.pinned
        ttlSeconds = Int(info.ttlSeconds)
        lastUsedMicros = info.lastUsedMicros
        idleSeconds = Double(nowMicros &- min(nowMicros, info.lastUsedMicros)) / 1e6
    }

    var idle: String { formatAge(micros: UInt64(idleSeconds * 1e6)) + " ago" }
    var ttl: String { ttlSeconds == 0 ? "none" : "\(ttlSeconds)s" + (pinned ? " (pinned: never expires)" : "") }
    var modelLabel: String { model.map { "\($0) (\(modelID))" } ?? modelID }

    static let header = ["NAME", "MODEL", "TOKENS", "RAM", "DISK", "PINNED", "TTL", "LAST USED"]
    var row: [String] {
        [name, model ?? modelID, "\(tokens)", "\(ramTokens)", "\(diskTokens)", pinned ? "yes" : "no",
         ttlSeconds == 0 ? "none" : "\(ttlSeconds)s", idle]
    }

    func printDetail() {
        printTable(["SESSION", name], [
            ["model", modelLabel],
            ["tokens", "\(tokens) (\(ramTokens) in RAM, \(diskTokens) on disk)"],
            ["pinned", pinned ? "yes" : "no"],
            ["ttl", ttl],
            ["last used", idle],
        ])
    }
}

/// `kvtier sessions …`: the tenant's named sequences.
struct SessionsCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sessions",
        abstract: "List, show, pin, fork and delete a running kvtierd's sessions (of this user's tenant).",
        discussion: "Without a subcommand: list them, most recently used first.",
        subcommands: [List.self, Show.self, Pin.self, Unpin.self, TTL.self, Fork.self, Delete.self],
        defaultSubcommand: List.self
    )

    /// Prints one session after a change: its detail, or JSON.
    static func report(_ client: KVTierClient, _ models: ModelDirectory, name: String, message: String, json: Bool) async throws {
        let view = SessionView(try await client.sessionInfo(name), models: models)
        if json { return try printJSON(view) }
        print(message)
        view.printDetail()
    }

    /// `pin` and `unpin`: the change, then the session as it is now.
    static func setPinned(_ pinned: Bool, name: String, connection: DaemonConnectionOptions, json: Bool) async throws {
        try await connection.withClient { client in
            let models = try await ModelDirectory(client)
            try await client.sessionPin(name, pinned: pinned)
            try await report(client, models, name: name, message: "\(pinned ? "pinned" : "unpinned") '\(name)'", json: json)
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "List the sessions, most recently used first.")

        @OptionGroup var connection: DaemonConnectionOptions
        @Flag(help: "Print a JSON array for scripts.") var json = false

        func run() async throws {
            try await connection.withClient { client in
                let models = try await ModelDirectory(client)
                let now = Clocks.wallMicros()
                // The list carries no tier counts (they walk every page): ask each session.
                var views: [SessionView] = []
                for entry in try await client.sessionList() {
                    do {
                        views.append(SessionView(try await client.sessionInfo(entry.name), models: models, nowMicros: now))
                    } catch KVTierClientError.server(.notFound, _) {
                        continue  // Deleted or expired since the list.
                    }
                }
                if json { return try printJSON(views) }
                guard !views.isEmpty else { return print("no sessions (a PUT with a session name creates one)") }
                printTable(SessionView.header, views.map(\.row))
            }
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "show", abstract: "Show one session: model, tokens by tier, pin, TTL, last use (does not count as a use).")

        @OptionGroup var connection: DaemonConnectionOptions
        @Argument(help: "The session's name.") var name: String
        @Flag(help: "Print JSON for scripts.") var json = false

        func run() async throws {
            try await connection.withClient { client in
                let models = try await ModelDirectory(client)
                let view = SessionView(try await client.sessionInfo(name), models: models)
                if json { return try printJSON(view) }
                view.printDetail()
            }
        }
    }

    struct Pin: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "pin",
            abstract: "Pin a session: its pages load into RAM now and stay there, and it never expires.",
            discussion: "Pinned sessions together may hold half the RAM budget; a pin beyond that fails (unpin another first)."
        )

        @OptionGroup var connection: DaemonConnectionOptions
        @Argument(help: "The session's name.") var name: String
        @Flag(help: "Print the session afterwards as JSON.") var json = false

        func run() async throws {
            try await SessionsCommand.setPinned(true, name: name, connection: connection, json: json)
        }
    }

    struct Unpin: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "unpin", abstract: "Unpin a session: its pages are evicted as usual again and its TTL applies.")

        @OptionGroup var connection: DaemonConnectionOptions
        @Argument(help: "The session's name.") var name: String
        @Flag(help: "Print the session afterwards as JSON.") var json = false

        func run() async throws {
            try await SessionsCommand.setPinned(false, name: name, connection: connection, json: json)
        }
    }

    struct TTL: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "ttl",
            abstract: "Set a session's time to live: deleted this many seconds after its last use (0: never; pinned sessions never expire)."
        )

        @OptionGroup var connection: DaemonConnectionOptions
        @Argument(help: "The session's name.") var name: String
        @Argument(help: "Seconds after the last use (0: no TTL).") var seconds: UInt32
        @Flag(help: "Print the session afterwards as JSON.") var json = false

        func run() async throws {
            try await connection.withClient { client in
                let models = try await ModelDirectory(client)
                try await client.sessionTTL(name, seconds: seconds)
                let message = seconds == 0 ? "'\(name)' has no TTL now" : "'\(name)' expires \(seconds)s after its last use"
                try await SessionsCommand.report(client, models, name: name, message: message, json: json)
            }
        }
    }

    struct Fork: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "fork",
            abstract: "Copy a session under a new name (unpinned, same TTL); both share every page until they diverge."
        )

        @OptionGroup var connection: DaemonConnectionOptions
        @Argument(help: "The session to copy.") var from: String
        @Argument(help: "The new session's name (must not exist).") var to: String
        @Flag(help: "Print the new session as JSON.") var json = false

        func run() async throws {
            try await connection.withClient { client in
                let models = try await ModelDirectory(client)
                let view = SessionView(try await client.sessionFork(from, to: to), models: models)
                if json { return try printJSON(view) }
                print("forked '\(from)' as '\(to)'")
                view.printDetail()
            }
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "delete",
            abstract: "Forget a session's name. Its pages stay as ordinary cache (other sequences may share them) until evicted."
        )

        @OptionGroup var connection: DaemonConnectionOptions
        @Argument(help: "The session's name.") var name: String
        @Flag(help: "Print {\"deleted\": NAME} for scripts.") var json = false

        func run() async throws {
            try await connection.withClient { client in
                try await client.sessionDelete(name)
                if json { return try printJSON(["deleted": name]) }
                print("deleted '\(name)'")
            }
        }
    }
}
