@preconcurrency import Glibc
import ArgumentParser
import KVTierClient
import KVTierCore
import KVTierProtocol
import KVTierTools

/// What `kvtier export` and `kvtier import` moved (their `--json` form).
struct ArchiveTransfer: Encodable {
    var session: String
    var file: String
    var modelID: String
    var model: String
    var tokens: Int
    /// Keys and values, 16-bit each.
    var kvBytes: Int
    var fileBytes: Int
    var pinned: Bool
    var ttlSeconds: Int

    init(_ archive: SessionArchive, session: String, file: String, fileBytes: Int) {
        self.session = session
        self.file = file
        modelID = modelHex(archive.modelID)
        model = archive.model.name
        tokens = archive.tokens.count
        kvBytes = 2 * (archive.keys.count + archive.values.count)
        self.fileBytes = fileBytes
        pinned = archive.pinned
        ttlSeconds = Int(archive.ttlSeconds)
    }

    var summary: String {
        "\(tokens) tokens of \(model) (\(modelID)), \(ByteCount(kvBytes)) of KV, file \(ByteCount(fileBytes))"
            + (pinned ? ", pinned" : "") + (ttlSeconds > 0 ? ", TTL \(ttlSeconds)s" : "")
    }
}

/// The size of a file, for the report (0 when it cannot be read).
private func fileSize(_ path: String) -> Int {
    var info = stat()
    return stat(path, &info) == 0 ? Int(info.st_size) : 0
}

/// `kvtier export SESSION FILE`.
struct ExportCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Write a session (model registration, settings, tokens and 16-bit KV) to a portable, checksummed file.",
        discussion: """
            The file (docs/format.md, "Session archive") restores exactly on any kvtierd with \
            'kvtier import'. Every token of the session must be cached: a session whose later pages \
            were deleted cannot be exported. Reading the session counts as resuming it (its TTL \
            restarts). Page bytes travel through shared memory when the daemon offers it.
            """
    )

    @OptionGroup var connection: DaemonConnectionOptions
    @Argument(help: "The session to export.") var session: String
    @Argument(help: "The file to write (replaced if it exists).") var file: String
    @Flag(help: "Print JSON for scripts.") var json = false

    func run() async throws {
        let progress = ProgressLine()
        let archive = try await connection.withClient(transfer: true) { client in
            let info = try await client.sessionInfo(session)
            let (modelID, tokens) = try await client.sessionTokens(session)
            let entry = try await ModelDirectory(client).require(modelID)
            // Registering again is idempotent and checks the registration still yields this id.
            let model = try await client.registerModel(entry.specification)
            guard model.modelID == modelID else {
                throw CommandFailure("model \(entry.registration.name) now registers as \(modelHex(model.modelID)), not \(modelHex(modelID)); cannot export")
            }
            progress.show("exporting '\(session)': reading \(tokens.count) tokens of KV…")
            let kv = try await client.get(model, tokens: tokens)
            guard kv.tokens == tokens.count else {
                let cached = try await client.lookup(model, tokens: tokens).cachedTokens
                if cached == tokens.count, !client.usesSharedMemory {
                    throw CommandFailure("kvtierd served \(kv.tokens) of \(tokens.count) tokens inline (one reply's limit): shared memory is unavailable"
                                         + (client.sharedMemoryUnavailableReason.map { " (\($0))" } ?? "") + "; run export on the daemon's host as its user")
                }
                throw CommandFailure("session '\(session)' has \(tokens.count) tokens but only \(cached) are cached; its later pages were "
                                     + "evicted and deleted, so it cannot be exported whole (re-put the sequence first)")
            }
            return SessionArchive(modelID: modelID, model: model.specification, name: session, ttlSeconds: info.ttlSeconds,
                                  pinned: info.pinned, tokens: tokens, keys: kv.keys, values: kv.values)
        }
        progress.show("exporting '\(session)': writing \(file)…")
        try archive.write(to: file)
        progress.clear()
        let transfer = ArchiveTransfer(archive, session: session, file: file, fileBytes: fileSize(file))
        if json { return try printJSON(transfer) }
        print("exported '\(session)' to \(file): \(transfer.summary)")
    }
}

/// `kvtier import FILE [--as NAME]`.
struct ImportCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import",
        abstract: "Restore a session from a 'kvtier export' file: verify it, register its model, put its KV, restore pin and TTL.",
        discussion: """
            The whole file is checked (checksum, sizes) before anything is sent; a damaged file is \
            refused. The model registers with the archive's shape and page size; when this daemon \
            gives it another id (a different fingerprint) nothing is imported. An existing session \
            of the same name is not replaced: delete it, or import under another name with --as.
            """
    )

    @OptionGroup var connection: DaemonConnectionOptions
    @Argument(help: "The archive to read.") var file: String
    @Option(name: .customLong("as"), help: "Import under this session name instead of the archived one.") var name: String?
    @Flag(help: "Print JSON for scripts.") var json = false

    func run() async throws {
        let progress = ProgressLine()
        progress.show("importing: reading and verifying \(file)…")
        let archive: SessionArchive
        do { archive = try SessionArchive.read(from: file) } catch {
            progress.clear()
            throw CommandFailure("\(file): \(error)")
        }
        let session = name ?? archive.name
        try await connection.withClient(transfer: true) { client in
            if (try? await client.sessionInfo(session)) != nil {
                throw CommandFailure("session '\(session)' exists already; delete it ('kvtier sessions delete \(session)') or import with --as NEW-NAME")
            }
            let model = try await client.registerModel(archive.model)
            guard model.modelID == archive.modelID else {
                throw CommandFailure("kvtierd registers model \(archive.model.name) (\(archive.model.pageTokens) tokens per page) as "
                                     + "\(modelHex(model.modelID)), but the archive was written under \(modelHex(archive.modelID)); "
                                     + "its pages would not match this daemon's")
            }
            progress.show("importing '\(session)': sending \(archive.tokens.count) tokens of KV…")
            let cached = try await client.put(model, tokens: archive.tokens, keys: archive.keys, values: archive.values, session: session)
            guard cached == archive.tokens.count else {
                throw CommandFailure("kvtierd cached \(cached) of \(archive.tokens.count) tokens; the session may be incomplete (check 'kvtier status')")
            }
            if archive.pinned { try await client.sessionPin(session, pinned: true) }
            if archive.ttlSeconds > 0 { try await client.sessionTTL(session, seconds: archive.ttlSeconds) }
        }
        progress.clear()
        let transfer = ArchiveTransfer(archive, session: session, file: file, fileBytes: fileSize(file))
        if json { return try printJSON(transfer) }
        print("imported '\(session)' from \(file): \(transfer.summary)")
    }
}
