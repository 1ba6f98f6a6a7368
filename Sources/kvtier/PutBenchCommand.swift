import ArgumentParser
import KVTierCore
import KVTierTools

/// `kvtier bench put`: steady-state RAM-tier puts and durable puts against same-run baselines.
struct PutBenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "put",
        abstract: "Measure kvtierd PUT throughput (RAM tier, with and without eviction) and durable puts against same-run baselines.",
        discussion: """
            Starts its own kvtierd per configuration (the one beside this kvtier, or --daemon) on a \
            temporary socket and state directory, and puts prefixes of --prefix-pages pages \
            (--layers × [--page-tokens, --kv-heads, --head-dim] float16 each; 1 MiB by default) \
            through one KVTierClient with shared memory. 'fits': a RAM budget that holds every \
            timed put, filled once and emptied first; 'full': a RAM budget of --full-budget-prefixes \
            prefixes, filled first, so every put evicts pages to the disk tier. Both against a \
            single-core memcpy of a prefix's bytes. 'durable': plain, durable and session puts of \
            each --durable-pages count, against a pwrite of the bytes the durable put added to \
            the disk tier (--disk-codec) plus one fdatasync, to a file in the daemon's state directory.
            """
    )

    @Option(name: .customLong("prefix-pages"), help: "Pages per RAM-tier put.") var prefixPages = 64
    @Option(help: "Timed puts per RAM-tier configuration.") var puts = 16
    @Option(name: .customLong("full-budget-prefixes"), help: "RAM budget of the 'full' configuration, in prefixes.")
    var fullBudgetPrefixes = 4
    @Option(name: .customLong("durable-pages"), parsing: .upToNextOption, help: "Page counts of the durable puts.")
    var durablePages = [16, 64]
    @Option(name: .customLong("durable-repetitions"), help: "Timed rounds per durable page count.") var durableRepetitions = 8
    @Option(name: .customLong("disk-codec"), help: "The daemon's --disk-codec.") var diskCodec = "k4v4"
    @Option(parsing: .upToNextOption, help: "Configurations to run: fits, full, durable.") var scenarios = PutBenchmark.Scenario.allCases
    @Option(help: "Layers of the model.") var layers = 1
    @Option(name: .customLong("kv-heads"), help: "KV heads of the model.") var kvHeads = 8
    @Option(name: .customLong("head-dim"), help: "Head dimension of the model.") var headDim = 128
    @Option(name: .customLong("page-tokens"), help: "Tokens per page.") var pageTokens = 256
    @Option(help: "kvtierd binary (default: the one beside this kvtier).") var daemon: String?
    @Flag(help: "Print the report as JSON.") var json = false

    func run() async throws {
        var benchmark = PutBenchmark(daemonPath: daemon ?? ServeBenchmark.daemonBeside(currentExecutablePath()))
        benchmark.prefixPages = prefixPages
        benchmark.puts = puts
        benchmark.fullBudgetPrefixes = fullBudgetPrefixes
        benchmark.durablePages = durablePages
        benchmark.durableRepetitions = durableRepetitions
        benchmark.diskCodec = diskCodec
        benchmark.scenarios = scenarios
        benchmark.layers = layers
        benchmark.kvHeads = kvHeads
        benchmark.headDim = headDim
        benchmark.pageTokens = pageTokens
        let signals = installBenchInterruptCleanup()
        defer { for source in signals { source.cancel() } }
        let r: PutBenchmark.Report
        // A failure of the run (the daemon exited, a put was refused) is not a usage error: it is
        // reported as it is, with exit status 1, not as bad arguments with the usage text.
        r = try await benchmark.run()
        if json { return try printJSON(r) }
        func f(_ v: Double, _ places: Int = 2) -> String { formatDecimal(v, places: places) }
        print("model \(r.model), prefix \(r.prefixPages) pages = \(ByteCount(r.prefixBytes)), disk codec \(r.diskCodec), "
              + "load \(r.loadAverageStart ?? "?") → \(r.loadAverageEnd ?? "?")")
        if !r.ram.isEmpty {
            printTable(["RAM BUDGET", "PUTS", "PUT GB/s", "P50 ms", "P99 ms", "MEMCPY GB/s", "PUT/MEMCPY", "EVICTIONS"], r.ram.map {
                ["\($0.configuration) (\(ByteCount($0.ramBudgetBytes)))", "\($0.puts)", f($0.gbps), f($0.p50Millis, 1), f($0.p99Millis, 1),
                 f($0.memcpyGBps), f($0.vsMemcpy) + "×", "\($0.evictions)"]
            })
        }
        if !r.durable.isEmpty {
            if !r.ram.isEmpty { print("") }
            printTable(["PAGES", "ENCODED", "PLAIN ms", "DURABLE ms", "SESSION ms", "WRITE+SYNC ms", "DURABLE/RAW", "SESSION/RAW"], r.durable.map {
                ["\($0.pages)", "\(ByteCount($0.encodedBytes))", "\(f($0.plainP50Millis, 1)) (p99 \(f($0.plainP99Millis, 1)))",
                 "\(f($0.durableP50Millis, 1)) (p99 \(f($0.durableP99Millis, 1)))", "\(f($0.sessionP50Millis, 1)) (p99 \(f($0.sessionP99Millis, 1)))",
                 "\(f($0.writeSyncP50Millis, 1)) (p99 \(f($0.writeSyncP99Millis, 1)))", f($0.durableVsWriteSync) + "×", f($0.sessionVsWriteSync) + "×"]
            })
        }
    }
}

extension PutBenchmark.Scenario: ExpressibleByArgument {}
