@preconcurrency import Glibc
import ArgumentParser
import KVTierClient
import KVTierCore
import KVTierProtocol

/// A command's failure with a message that says what to do; printed as `Error: …`, exit status 1.
struct CommandFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// A model id on the command line: 16 hex digits as `kvtier` prints them, with or without `0x`.
struct ModelIDArgument: ExpressibleByArgument {
    var value: UInt64

    init?(argument: String) {
        var digits = Substring(argument)
        if digits.hasPrefix("0x") || digits.hasPrefix("0X") { digits = digits.dropFirst(2) }
        guard !digits.isEmpty, digits.count <= 16, let value = UInt64(digits, radix: 16), value != 0 else { return nil }
        self.value = value
    }

    static var defaultValueDescription: String { "hex" }
}

/// How model ids are printed everywhere in the CLI (as `kvtier pages DIR` and the page files do).
func modelHex(_ id: UInt64) -> String { PageKey.hex(id) }

extension ModelEntry {
    var specification: ModelSpecification {
        ModelSpecification(name: registration.name, shape: registration.shape,
                           pageTokens: Int(registration.pageTokens), ropeTheta: registration.ropeTheta,
                           diskCodec: registration.diskCodec ?? "")
    }

    /// Models are host-wide and known to every connection, so no `REGISTER_MODEL` is needed to
    /// name this one in LOOKUP, GET or EVICT.
    var registered: RegisteredModel {
        RegisteredModel(modelID: modelID, specification: specification, pageTokens: Int(registration.pageTokens))
    }
}

/// The daemon's registered models (`MODELS`), by id.
struct ModelDirectory {
    let entries: [ModelEntry]

    init(_ client: KVTierClient) async throws {
        entries = try await client.models()
    }

    func entry(_ id: UInt64) -> ModelEntry? { entries.first { $0.modelID == id } }

    /// `name (id)`, or the bare id of a model the daemon does not list.
    func label(_ id: UInt64) -> String {
        entry(id).map { "\($0.registration.name) (\(modelHex(id)))" } ?? modelHex(id)
    }

    func name(_ id: UInt64) -> String? { entry(id)?.registration.name }

    /// The model, or an error listing the ones the daemon has.
    func require(_ id: UInt64) throws -> ModelEntry {
        if let entry = entry(id) { return entry }
        let known = entries.map {
            "\(modelHex($0.modelID)) \($0.registration.name) (\($0.registration.pageTokens) tokens per page"
                + ($0.registration.namedDiskCodec.map { ", disk codec \($0))" } ?? ")")
        }
        throw CommandFailure("model \(modelHex(id)) is not registered with kvtierd; "
                             + (known.isEmpty ? "no model is registered yet" : "registered: " + known.joined(separator: "; ")))
    }
}

/// Token ids as the CLI accepts them: integers separated by commas and/or white space, optionally
/// inside one JSON array (`[1, 2, 3]`).
func parseTokens(_ text: String, source: String) throws -> [UInt32] {
    var body = Substring(text).drop { $0.isWhitespace }
    while body.last?.isWhitespace == true { body = body.dropLast() }
    if body.first == "[" {
        guard body.last == "]" else { throw CommandFailure("\(source): a JSON array of token ids must end with ]") }
        body = body.dropFirst().dropLast()
    }
    var tokens: [UInt32] = []
    for (index, part) in body.split(whereSeparator: { $0 == "," || $0.isWhitespace }).enumerated() {
        guard let token = UInt32(part) else {
            throw CommandFailure("\(source): item \(index) '\(part.prefix(20))' is not a token id (an integer 0...\(UInt32.max))")
        }
        tokens.append(token)
    }
    guard !tokens.isEmpty else { throw CommandFailure("\(source): no token ids (give integers separated by commas or spaces, or a JSON array)") }
    return tokens
}

/// `parseTokens` over a file's contents.
func readTokensFile(_ path: String) throws -> [UInt32] {
    guard let file = fopen(path, "rb") else { throw CommandFailure("cannot open \(path): \(String(cString: strerror(errno)))") }
    defer { fclose(file) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { fread($0.baseAddress, 1, $0.count, file) }
        if n == 0 { break }
        bytes += chunk[0..<n]
    }
    guard ferror(file) == 0 else { throw CommandFailure("cannot read \(path): \(String(cString: strerror(errno)))") }
    return try parseTokens(String(decoding: bytes, as: UTF8.self), source: path)
}

/// A duration as a short age: `42s`, `5m 03s`, `2h 04m`, `3d 01h`.
func formatAge(micros: UInt64) -> String {
    let seconds = micros / 1_000_000
    func two(_ n: UInt64) -> String { n < 10 ? "0\(n)" : "\(n)" }
    if seconds < 60 { return "\(seconds)s" }
    if seconds < 3600 { return "\(seconds / 60)m \(two(seconds % 60))s" }
    if seconds < 86_400 { return "\(seconds / 3600)h \(two(seconds / 60 % 60))m" }
    return "\(seconds / 86_400)d \(two(seconds / 3600 % 24))h"
}

/// One line on standard error, rewritten in place, for transfers that take a while; shown only
/// when standard error is a terminal, so scripts and logs never see it.
final class ProgressLine {
    private let enabled = isatty(STDERR_FILENO) == 1
    private var shown = false

    func show(_ text: String) {
        guard enabled else { return }
        shown = true
        fputs("\r\(text)\u{1B}[K", stderr)
        fflush(stderr)
    }

    func clear() {
        guard shown else { return }
        shown = false
        fputs("\r\u{1B}[K", stderr)
        fflush(stderr)
    }

    deinit { clear() }
}

extension DaemonConnectionOptions {
    /// A connection that maps the tenant's shared arena when offered, for commands that move KV
    /// (export, import); falls back to inline transfer otherwise.
    func connectForTransfer() async throws -> KVTierClient {
        do {
            return try await KVTierClient.connect(socketPath: try socketPath, clientName: "kvtier-cli", mapSharedMemory: true,
                                                  replyTimeoutSeconds: 600)
        } catch {
            throw DaemonUnreachable(detail: "\(error)")
        }
    }
}

extension DaemonConnectionOptions {
    /// Runs `body` with a connection (mapping the shared arena when `transfer`), closed afterwards
    /// whether `body` returns or throws, so the daemon ends the connection's leases at once.
    func withClient<R>(transfer: Bool = false, _ body: (KVTierClient) async throws -> R) async throws -> R {
        let client = transfer ? try await connectForTransfer() : try await connect()
        do {
            let result = try await body(client)
            await client.close()
            return result
        } catch {
            await client.close()
            throw error
        }
    }
}
