@preconcurrency import Glibc
import Foundation
import KVTierClient
import KVTierCodec
import KVTierCore
import KVTierTestProcess
import Testing

/// `--metrics-listen`: Prometheus text on GET /metrics of a real kvtierd, values that follow the
/// traffic, and nothing else served.
@Suite(.serialized, .enabled(if: Checkout.binariesBuilt, Checkout.missingBinaries))
struct MetricsTests {
    static let spec = ModelSpecification(name: "metrics-test", layers: 2, kvHeads: 2, headDim: 32, elementType: .float16,
                                         pageTokens: 16, ropeTheta: 10_000)

    /// Starts kvtierd with metrics on a free loopback port (retrying if another process took it).
    static func startWithMetrics(_ folder: TemporaryFolder) async throws -> (ChildProcess, UInt16) {
        var lastError: (any Error)?
        for _ in 0..<3 {
            let port = try freeLoopbackPort()
            do {
                return (try await startDaemon(in: folder, ["--metrics-listen", "127.0.0.1:\(port)"]), port)
            } catch {
                lastError = error
            }
        }
        throw lastError!
    }

    /// The codec policy's choice per tenant and model, as gauges beside its counters.
    @Test func codecPolicyChoicesAreGaugesPerTenantAndModel() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let config = try folder.write("kvtierd.json", #"{"codecPolicy": {"mode": "auto", "samplePages": 2}}"#)
        var started: (ChildProcess, UInt16)?
        for _ in 0..<3 where started == nil {
            let port = try freeLoopbackPort()
            started = try? await (startDaemon(in: folder, ["--metrics-listen", "127.0.0.1:\(port)", "--config", config]), port)
        }
        guard let (daemon, port) = started else { throw TestFailure("kvtierd did not start with metrics") }
        defer { daemon.stop() }
        let client = try await KVTierClient.connect(socketPath: folder.path + "/s.sock")
        let model = try await client.registerModel(Self.spec)
        var random = SplitMix64(seed: 77)
        let elements = Self.spec.shape.elements(tokens: 32)
        let keys = (0..<elements).map { _ in UInt16.random(in: 0...0x3BFF, using: &random) }  // finite, below 1.0
        let values = (0..<elements).map { _ in UInt16.random(in: 0...0x3BFF, using: &random) }
        #expect(try await client.put(model, tokens: Array(0..<32), keys: keys, values: values) == 32)
        // The measurement runs in the background: wait for its answer (CODECS), not for a time.
        var choice = try await client.codecChoices().first { $0.modelID == model.modelID }
        let deadline = ContinuousClock.now + .seconds(EventWaits.stuckSeconds)
        while choice?.phase == .measuring, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(20))
            choice = try await client.codecChoices().first { $0.modelID == model.modelID }
        }
        await client.close()
        guard let choice, choice.phase == .chosen else { throw TestFailure("no choice: \(String(describing: choice))") }

        let body = try httpRequest(port: port, path: "/metrics").body
        let labels = "{tenant=\"\(getuid())\",model=\"\(PageKey.hex(model.modelID))\"}"
        let error = sample("kvtier_codec_attention_error" + labels, in: body)
        #expect(error != nil && abs(error! - Double(choice.attentionError)) < 1e-6, "\(body)")
        let codec = try Codec(tag: choice.codecTag)
        let bits = codec.quantizer.bitsPerElement(SectionShape(tokens: 16, kvHeads: 2, headDim: 32))
        #expect(sample("kvtier_codec_bits_per_element" + labels, in: body) == bits)
        #expect(sample("kvtier_codec_choices_total", in: body) == 1)
        #expect(sample("kvtier_codec_measurements_total", in: body) == 1)
        #expect(sample("kvtier_codec_fallbacks_total", in: body) == 0)
    }

    @Test func metricsFollowTraffic() async throws {
        let seed = UInt64.random(in: 0...UInt64.max)
        print("MetricsTests.metricsFollowTraffic: seed \(seed)")
        var random = SplitMix64(seed: seed)
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let (daemon, port) = try await Self.startWithMetrics(folder)
        defer { daemon.stop() }

        let before = try httpRequest(port: port, path: "/metrics")
        #expect(before.status == 200)
        for name in ["kvtier_tier_pages{tier=\"ram\"}", "kvtier_tier_pages{tier=\"disk\"}", "kvtier_tier_bytes{tier=\"ram\"}",
                     "kvtier_lookup_hits_total{tier=\"ram\"}", "kvtier_lookup_misses_total", "kvtier_evictions_total",
                     "kvtier_promotions_total", "kvtier_checksum_failures_total", "kvtier_clients", "kvtier_sessions",
                     "kvtier_disk_file_bytes", "kvtier_io_path{path=\"io_uring\"}", "kvtier_io_path{path=\"pread\"}"] {
            #expect(sample(name, in: before.body) != nil, "\(name) missing from /metrics:\n\(before.body)")
        }
        #expect(sample("kvtier_puts_total", in: before.body) == 0)
        #expect(sample("kvtier_tier_pages{tier=\"ram\"}", in: before.body) == 0)
        let paths = (sample("kvtier_io_path{path=\"io_uring\"}", in: before.body) ?? -1) + (sample("kvtier_io_path{path=\"pread\"}", in: before.body) ?? -1)
        #expect(paths == 1, "exactly one io path is in use")
        #expect(before.body.split(separator: "\n").allSatisfy { $0.hasPrefix("#") || $0.hasPrefix("kvtier_") },
                "every metric is named kvtier_*")

        let client = try await KVTierClient.connect(socketPath: folder.path + "/s.sock")
        let model = try await client.registerModel(Self.spec)
        let tokens = (0..<40).map { _ in UInt32.random(in: 0..<128_000, using: &random) }
        let elements = Self.spec.shape.elements(tokens: 40)
        let keys = (0..<elements).map { _ in UInt16.random(in: 0...0x7BFF, using: &random) }
        let values = (0..<elements).map { _ in UInt16.random(in: 0...0x7BFF, using: &random) }
        #expect(try await client.put(model, tokens: tokens, keys: keys, values: values) == 40)
        #expect(try await client.lookup(model, tokens: tokens).cachedTokens == 40)
        #expect(try await client.lookup(model, tokens: [7, 7, 7]).cachedTokens == 0)

        let during = try httpRequest(port: port, path: "/metrics").body
        #expect(sample("kvtier_clients", in: during) == 1, "one client connected")
        await client.close()
        try await Task.sleep(for: .milliseconds(200))

        let after = try httpRequest(port: port, path: "/metrics").body
        #expect(sample("kvtier_puts_total", in: after) == 1, "\(after)")
        #expect((sample("kvtier_tier_pages{tier=\"ram\"}", in: after) ?? 0) >= 2, "40 tokens of 16-token pages")
        #expect((sample("kvtier_tier_bytes{tier=\"ram\"}", in: after) ?? 0) > 0)
        // The client's PUT looks up first (a miss), then one full hit and one miss of ours.
        let lookups = sample("kvtier_lookups_total", in: after) ?? 0
        #expect(lookups >= 2)
        #expect(sample("kvtier_lookup_hits_total{tier=\"ram\"}", in: after) == 1)
        #expect(sample("kvtier_lookup_misses_total", in: after) == lookups - 1)
        #expect(sample("kvtier_connections_accepted_total", in: after) == (sample("kvtier_connections_accepted_total", in: before.body) ?? -1) + 1)
        #expect(sample("kvtier_clients", in: after) == 0)
        #expect(sample("kvtier_request_duration_seconds_count{opcode=\"PUT\"}", in: after) == 1, "PUT latency recorded:\n\(after)")
        #expect(sample("kvtier_request_duration_seconds_count{opcode=\"LOOKUP\"}", in: after) == lookups)
        #expect(after.contains("# TYPE kvtier_request_duration_seconds histogram"))

        // Scraping twice does not count twice.
        let again = try httpRequest(port: port, path: "/metrics").body
        #expect(sample("kvtier_puts_total", in: again) == 1)
    }

    /// A durable session put writes to disk; evicting and reading it back reads and decodes.
    @Test func diskAndPrefetchMetricsFollowDiskTraffic() async throws {
        var random = SplitMix64(seed: 11)
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let (daemon, port) = try await Self.startWithMetrics(folder)
        defer { daemon.stop() }
        let client = try await KVTierClient.connect(socketPath: folder.path + "/s.sock")
        let model = try await client.registerModel(Self.spec)
        let tokens = (0..<40).map { _ in UInt32.random(in: 0..<128_000, using: &random) }
        let elements = Self.spec.shape.elements(tokens: 40)
        let keys = (0..<elements).map { _ in UInt16.random(in: 0...0x7BFF, using: &random) }
        let values = (0..<elements).map { _ in UInt16.random(in: 0...0x7BFF, using: &random) }
        #expect(try await client.put(model, tokens: tokens, keys: keys, values: values, session: "chat") == 40)
        _ = try await client.evictSession("chat")
        _ = try await client.sessionTokens("chat")  // resume: prefetches the 3 pages
        _ = try await client.get(model, tokens: tokens)
        await client.close()

        let body = try httpRequest(port: port, path: "/metrics").body
        #expect((sample("kvtier_disk_commit_seconds_count", in: body) ?? 0) >= 1, "\(body)")
        #expect((sample("kvtier_disk_written_bytes_total", in: body) ?? 0) > 0)
        #expect(sample("kvtier_codec_seconds_count{op=\"encode\"}", in: body) == 3, "one encode per page")
        #expect(sample("kvtier_disk_read_seconds_count", in: body) == 3, "each page read once: by prefetch, or by the GET")
        #expect(sample("kvtier_codec_seconds_count{op=\"decode\"}", in: body) == 3)
        #expect((sample("kvtier_disk_read_bytes_total", in: body) ?? 0) > 0)
        #expect(sample("kvtier_prefetch_pages_total{state=\"issued\"}", in: body) == 3)
        let loaded = sample("kvtier_prefetch_pages_total{state=\"loaded\"}", in: body) ?? -1
        #expect(loaded >= 0 && loaded <= 3 && sample("kvtier_prefetch_pages_total{state=\"useful\"}", in: body) == loaded)
        #expect(sample("kvtier_prefetch_accuracy_ratio", in: body) == loaded / 3, "used over issued")
        #expect(sample("kvtier_prefetch_pages_total{state=\"wasted\"}", in: body) == 0)
        let late = sample("kvtier_prefetch_late_pages_total", in: body) ?? -1
        #expect(late >= 0 && late <= loaded, "a GET that waited for a prefetch read is late: \(late)")
        #expect(sample("kvtier_sessions", in: body) == 1)
    }

    @Test func onlyGetMetricsIsServed() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let (daemon, port) = try await Self.startWithMetrics(folder)
        defer { daemon.stop() }
        #expect(try httpRequest(port: port, path: "/").status == 404)
        #expect(try httpRequest(port: port, path: "/metricsx").status == 404)
        #expect(try httpRequest(port: port, method: "POST", path: "/metrics").status == 405)
        let head = try httpRequest(port: port, method: "HEAD", path: "/metrics")
        #expect(head.status == 200 && head.body.isEmpty)
        #expect(try httpRequest(port: port, path: "/metrics?x=1").status == 200)
        #expect(daemon.poll() == nil, "the daemon survived odd requests:\n\(daemon.log)")
    }

    @Test func metricsAreOffByDefault() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let daemon = try await startDaemon(in: folder)
        defer { daemon.stop() }
        #expect(!daemon.log.contains("metrics listening"), "\(daemon.log)")
    }
}
