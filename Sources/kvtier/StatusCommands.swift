@preconcurrency import Glibc
import ArgumentParser
import KVTierClient
import KVTierCore

/// Options every command that talks to a running daemon shares.
struct DaemonConnectionOptions: ParsableArguments {
    @Option(help: "kvtierd's socket (default: the daemon's default, e.g. /run/kvtier/kvtierd.sock as root).")
    var socket: String?

    var socketPath: String {
        get throws { try socket ?? KVTierPaths.defaultSocketPath() }
    }

    /// A control connection: no shared arena is mapped, nothing but small requests are sent.
    func connect() async throws -> KVTierClient {
        do {
            return try await KVTierClient.connect(socketPath: try socketPath, clientName: "kvtier-cli", mapSharedMemory: false,
                                                  replyTimeoutSeconds: 10)
        } catch {
            throw DaemonUnreachable(detail: "\(error)")
        }
    }
}

/// The daemon did not answer; printed as the command's error (exit status 1).
struct DaemonUnreachable: Error, CustomStringConvertible {
    var detail: String
    var description: String { "\(detail) (check `systemctl status kvtierd`, or pass its socket with --socket)" }
}

/// `kvtier status`: tiers, sessions and traffic counters of a running daemon.
struct StatusCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show a running kvtierd's tiers (pages, bytes, budget, hit rates), sessions and counters.",
        discussion: "JSON (--json) has at least the keys tiers (ram, disk) and sessions; counters holds every raw STATUS counter."
    )

    @OptionGroup var connection: DaemonConnectionOptions
    @Flag(help: "Print JSON for scripts.") var json = false

    func run() async throws {
        let client = try await connection.connect()
        let counters = try await client.status()
        let codecs = try await CodecChoiceView.fetch(client, models: ModelDirectory(client))
        await client.close()
        var view = DaemonStatusView(socket: try connection.socketPath, counters: counters)
        view.codecs = codecs
        if json {
            try printJSON(view)
            return
        }
        print("kvtierd at \(view.socket)")
        printTable(DaemonStatusView.tierHeader, view.tierRows)
        print("")
        printTable(["COUNTER", "VALUE"], [
            ["sessions", "\(view.sessions)"],
            ["lookups", "\(view.lookups) (\(view.misses) misses)"],
            ["leases", "\(view.leases)"],
            ["models", "\(view.models)"],
            ["tenants", "\(view.tenants)"],
            ["evictions", "\(view.counters["evictions"] ?? 0)"],
            ["promotions", "\(view.counters["promotions"] ?? 0)"],
            ["prefetch", view.prefetchSummary],
            ["checksum failures", "\(view.counters["disk_checksum_failures"] ?? 0)"],
        ] + (view.remoteSummary.map { [["remote", $0]] } ?? []) + (view.vramSummary.map { [["vram", $0]] } ?? []))
        if !codecs.isEmpty {
            print("")
            printTable(CodecChoiceView.header, codecs.map(\.row))
        }
    }
}

/// `kvtier top`: the status table redrawn every interval, with per-second traffic rates.
struct TopCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "top",
        abstract: "A live view of a running kvtierd: tiers and traffic, redrawn every second (q or Ctrl-C quits)."
    )

    @OptionGroup var connection: DaemonConnectionOptions
    @Option(help: "Seconds between refreshes.") var interval: Double = 1
    @Option(help: "Stop after this many refreshes (default: until q or Ctrl-C).") var iterations: Int?

    /// Counters shown as per-second rates, with their column titles.
    static let rateColumns: [(counter: String, title: String)] = [
        ("lookups", "LOOKUP/s"), ("puts", "PUT/s"), ("gets", "GET/s"), ("pages_stored", "STORED/s"),
        ("promotions", "PROMOTE/s"), ("evictions", "EVICT/s"),
    ]

    /// One decimal below 10/s (so a trickle does not show as 0), whole numbers above.
    static func formatRate(_ perSecond: Double) -> String {
        guard perSecond < 10 else { return String(Int(perSecond.rounded())) }
        let tenths = Int((perSecond * 10).rounded())
        return "\(tenths / 10).\(tenths % 10)"
    }

    func validate() throws {
        guard interval >= 0.1, interval <= 3600 else { throw ValidationError("--interval must be between 0.1 and 3600 seconds") }
        if let iterations, iterations < 1 { throw ValidationError("--iterations must be at least 1") }
    }

    func run() async throws {
        let client = try await connection.connect()
        let keyboard = isatty(STDIN_FILENO) == 1 ? RawKeyboard() : nil
        let redraw = isatty(STDOUT_FILENO) == 1
        defer {
            keyboard?.restore()
            if redraw { print("\u{1B}[?25h", terminator: "") }  // Show the cursor again.
        }
        var previous: (counters: [String: UInt64], micros: UInt64)?
        var frame = 0
        while iterations.map({ frame < $0 }) ?? true {
            let counters = try await client.status()
            let now = Clocks.monotonicMicros()
            let view = DaemonStatusView(socket: try connection.socketPath, counters: counters)
            var rates: [String] = []
            for column in Self.rateColumns {
                guard let previous, now > previous.micros else { rates.append("-"); continue }
                let delta = Double((counters[column.counter] ?? 0) &- (previous.counters[column.counter] ?? 0))
                rates.append(Self.formatRate(delta * 1e6 / Double(now - previous.micros)))
            }
            previous = (counters, now)
            frame += 1
            if redraw { print("\u{1B}[?25l\u{1B}[H\u{1B}[2J", terminator: "") }  // Hide cursor, home, clear.
            print("kvtier top — \(view.socket) — refresh \(frame)\(iterations.map { "/\($0)" } ?? "") — q quits")
            print("")
            printTable(DaemonStatusView.tierHeader, view.tierRows)
            print("")
            printTable(Self.rateColumns.map(\.title), [rates])
            print("")
            print("sessions \(view.sessions)   leases \(view.leases)   models \(view.models)   tenants \(view.tenants)   lookups \(view.lookups) (\(view.misses) misses)")
            fflush(stdout)
            if let iterations, frame >= iterations { break }
            if let keyboard {
                if keyboard.waitForQuit(timeoutMillis: Int32(interval * 1000)) { break }
            } else {
                try await Task.sleep(for: .milliseconds(Int(interval * 1000)))
            }
        }
        await client.close()
    }
}

/// The terminal in non-canonical, no-echo, no-signal mode while `top` runs, so q and Ctrl-C
/// arrive as bytes and the terminal is restored on the way out (no signal handler needed).
final class RawKeyboard {
    private var saved = termios()
    private var active = false

    init() {
        guard tcgetattr(STDIN_FILENO, &saved) == 0 else { return }
        var raw = saved
        raw.c_lflag &= ~tcflag_t(ICANON | ECHO | ISIG)
        active = tcsetattr(STDIN_FILENO, TCSANOW, &raw) == 0
    }

    /// Waits up to `timeoutMillis` for a key; true when it was q, Q, Ctrl-C or Ctrl-D, or stdin closed.
    func waitForQuit(timeoutMillis: Int32) -> Bool {
        let deadline = Clocks.monotonicMicros() + UInt64(max(timeoutMillis, 0)) * 1000
        while true {
            let now = Clocks.monotonicMicros()
            guard now < deadline else { return false }
            var descriptor = pollfd(fd: STDIN_FILENO, events: Int16(POLLIN), revents: 0)
            let ready = poll(&descriptor, 1, Int32((deadline - now) / 1000))
            if ready < 0 && errno == EINTR { continue }
            guard ready > 0 else { return false }
            var byte: UInt8 = 0
            let n = read(STDIN_FILENO, &byte, 1)
            if n == 0 { return true }
            if n < 0 { continue }
            if byte == UInt8(ascii: "q") || byte == UInt8(ascii: "Q") || byte == 3 || byte == 4 { return true }
        }
    }

    func restore() {
        guard active else { return }
        _ = tcsetattr(STDIN_FILENO, TCSANOW, &saved)
        active = false
    }

    deinit { restore() }
}
