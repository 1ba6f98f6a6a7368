import ArgumentParser
import KVTierCore
import KVTierTools

/// `kvtier bench resume`: time to a resumed conversation's KV with and without prefetch.
struct ResumeBenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "resume",
        abstract: "Measure what prefetch on session resume buys: time from a request to the session's restored KV.",
        discussion: """
            Starts its own kvtierd (the one beside this kvtier, or --daemon), puts --sessions named \
            sessions of --tokens tokens, then for each think time and session: with every page out \
            of RAM and the page files out of the OS page cache, (1) waits the think time and GETs \
            the session (cold: the baseline), and (2) resumes the session (SESSION_TOKENS, which \
            starts loading its disk pages), waits the think time, and GETs it. Reports medians of \
            both, from the request's arrival to the KV copied out.
            """
    )

    @Option(help: "Sessions to put.") var sessions = 4
    @Option(help: "Tokens per session.") var tokens = 4096
    @Option(help: "Layers of the model.") var layers = 8
    @Option(name: .customLong("kv-heads"), help: "KV heads of the model.") var kvHeads = 8
    @Option(name: .customLong("head-dim"), help: "Head dimension of the model.") var headDim = 128
    @Option(name: .customLong("disk-codec"), help: "kvtierd's disk codec.") var diskCodec = "k4v4"
    @Option(name: .customLong("think-ms"), help: "Client work between the request's arrival and its GET, in ms (comma-separated).")
    var thinkMillis = "0,5,20"
    @Option(help: "Rounds over all sessions per think time.") var rounds = 3
    @Option(help: "kvtierd binary (default: the one beside this kvtier).") var daemon: String?
    @Flag(help: "Print the report as JSON.") var json = false

    func run() async throws {
        var options = ResumeBenchmark.Options(daemonPath: daemon ?? ServeBenchmark.daemonBeside(currentExecutablePath()))
        options.sessions = sessions
        options.tokensPerSession = tokens
        options.layers = layers
        options.kvHeads = kvHeads
        options.headDim = headDim
        options.diskCodec = diskCodec
        options.rounds = rounds
        options.thinkMillis = try thinkMillis.split(separator: ",").map {
            guard let value = Double($0.filter { $0 != " " }), value >= 0 else {
                throw ValidationError("--think-ms: '\($0)' is not a number of milliseconds")
            }
            return value
        }
        let quiet = json
        let report: ResumeBenchmark.Report
        do {
            report = try await ResumeBenchmark(options: options) { if !quiet { print($0) } }.run()
        } catch let error as ToolError {
            throw ValidationError(error.description)
        }
        if json { return try printJSON(report) }
        print("\(report.sessions) sessions × \(report.tokensPerSession) tokens (\(ByteCount(report.sessionBytes)) fp16 each), "
              + "\(report.modelShape), disk codec \(report.diskCodec), \(report.rounds) rounds")
        printTable(["THINK ms", "COLD ms", "RESUMED ms", "COLD GET ms", "GET AFTER RESUME ms", "SPEEDUP"], report.rows.map {
            [formatDecimal($0.thinkMillis, places: 0), formatDecimal($0.coldMillis, places: 1), formatDecimal($0.prefetchedMillis, places: 1),
             formatDecimal($0.coldGetMillis, places: 1), formatDecimal($0.prefetchedGetMillis, places: 1), formatDecimal($0.speedup, places: 2) + "×"]
        })
        print("prefetch: \(report.prefetchLoaded) pages loaded, \(report.prefetchUseful) served by a GET")
    }
}
