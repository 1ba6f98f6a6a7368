import ArgumentParser
import KVTierCodec
import KVTierCore
import KVTierRemote
import KVTierTools
import Logging

/// `kvtier bench remote`: one long prefix restored from the local disk tier, from the remote
/// tier (Redis), and the same values fetched with plain MGETs, in one run.
struct RemoteBenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "remote",
        abstract: "Restore a long prefix from disk, from the remote tier (Redis), and with plain Redis reads of the same bytes.",
        discussion: """
            Two stores in this process stand for two hosts, each with a disk tier under DIR: A \
            puts a prefix of the fixture model's shape (6 layers × 2 KV heads × 128, float16, \
            pages of 256 tokens), evicts it to its disk and to Redis; then, each round, A restores \
            it from its disk (page cache dropped) and B, whose disk is empty, from Redis (fetched, \
            MAC and checksum verified, decoded into shared memory); the baselines read the same \
            values into memory: pipelined GETs in the store's batches, MGETs, one GET per page. Starts redis-server in DIR unless --redis-url \
            names one (keys then go under a random prefix, expiring after an hour).
            """
    )

    @Option(help: "Folder for the stores (and Redis's socket).") var dir = "/tmp"
    @Option(help: "Bytes of fp16 KV in the prefix, e.g. 512MiB.") var bytes = "512MiB"
    @Option(help: "Codec of the pages (disk and remote).") var codec = "k4v4"
    @Option(help: "Rounds; medians are reported.") var rounds = 3
    @Option(help: "An existing Redis/Valkey (redis://… or unix://…; its password from KVTIER_REMOTE_PASSWORD).")
    var redisURL: String?
    @Flag(help: "Print the report as JSON.") var json = false

    func run() async throws {
        var benchmark = RemoteBenchmark()
        guard let size = ByteCount(parsing: bytes)?.bytes, size >= 1 << 20 else { throw ValidationError("--bytes: a size of at least 1MiB") }
        benchmark.prefixBytes = size
        do { benchmark.codec = try Codec(name: codec) } catch { throw ValidationError("\(error)") }
        guard (1...20).contains(rounds) else { throw ValidationError("--rounds: 1...20") }
        benchmark.rounds = rounds
        benchmark.parentDirectory = dir
        if let redisURL {
            do { benchmark.redisURL = try RedisURL.parse(redisURL) } catch { throw ValidationError("--redis-url: \(error)") }
        }
        var logger = Logger(label: "kvtier", factory: { StreamLogHandler.standardError(label: $0) })
        logger.logLevel = .warning
        let r = try await benchmark.run(logger: logger)
        if json { return try printJSON(r) }
        func gbps(_ v: Double) -> String { formatDecimal(v, places: 2) + " GB/s" }
        func ms(_ s: Double) -> String { formatDecimal(s * 1000, places: 0) + " ms" }
        printTable(["MEASURE", "VALUE"], [
            ["prefix", "\(r.tokens) tokens, \(r.pages) × \(r.pageShape) (\(ByteCount(r.fp16Bytes)) fp16), \(r.codec)"],
            ["in Redis", "\(ByteCount(r.remoteValueBytes)) of values\(r.redisVersion.map { ", redis \($0)" } ?? "")"],
            ["restore from disk", "\(ms(r.diskRestoreSeconds)), \(gbps(r.diskRestoreFp16GBps)) fp16 (\(r.ioPath))"],
            ["restore from remote", "\(ms(r.remoteRestoreSeconds)), \(gbps(r.remoteRestoreFp16GBps)) fp16"],
            ["pipelined GETs (baseline)", "\(ms(r.redisPipelinedGETSeconds)), \(gbps(r.redisPipelinedGETValueGBps)) of values (\(gbps(r.redisPipelinedGETFp16GBps)) fp16)"],
            ["MGETs, same batches", "\(ms(r.redisMGETSeconds)), \(gbps(r.redisMGETValueGBps)) of values"],
            ["one GET per page", "\(ms(r.redisGETSeconds)), \(gbps(r.redisGETValueGBps)) of values"],
            ["remote / pipelined GETs", formatDecimal(r.remoteVsPipelinedGET, places: 2) + "×"],
            ["remote = disk bytes", r.remoteMatchesDisk ? "yes" : "NO"],
        ])
    }
}
