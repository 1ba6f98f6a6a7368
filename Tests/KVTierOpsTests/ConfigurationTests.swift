@preconcurrency import Glibc
import Foundation
import Testing

/// kvtierd's configuration as an operator meets it: the JSON file, flags over it,
/// `--print-config`, start-up errors that name the key and what is allowed, and SIGHUP.
@Suite(.serialized, .enabled(if: Checkout.binariesBuilt, Checkout.missingBinaries))
struct ConfigurationTests {
    /// A config file (or flags) that must stop kvtierd, the key the message must name, and a
    /// fragment of what it must say is allowed.
    struct Invalid: CustomTestStringConvertible, Sendable {
        var json: String?
        var flags: [String] = []
        var key: String
        var allowed: String
        var testDescription: String { "\(key): \(json ?? flags.joined(separator: " "))" }
    }

    static let invalid: [Invalid] = [
        Invalid(json: #"{"ramBudget": "lots"}"#, key: "ramBudget", allowed: "a size such as"),
        Invalid(json: #"{"ramBudget": 5}"#, key: "ramBudget", allowed: "a size string"),
        Invalid(json: #"{"diskBudget": "-3GiB"}"#, key: "diskBudget", allowed: "a size such as"),
        Invalid(json: #"{"diskCodec": "gzip"}"#, key: "diskCodec", allowed: "k4v4"),
        Invalid(json: #"{"pageTokens": 0}"#, key: "pageTokens", allowed: "1..."),
        Invalid(json: #"{"ramBudget": "1GiB", "evictionHeadroom": "768MiB"}"#, key: "evictionHeadroom", allowed: "up to half of ramBudget"),
        Invalid(json: #"{"evictionHeadroom": "some"}"#, key: "evictionHeadroom", allowed: "a size such as"),
        Invalid(json: #"{"codecPolicy": "sometimes"}"#, key: "codecPolicy.mode", allowed: "fixed, auto"),
        Invalid(json: #"{"codecPolicy": {"mode": "auto", "maxAttentionError": 2}}"#, key: "codecPolicy.maxAttentionError", allowed: "a fraction from 0 to 1"),
        Invalid(json: #"{"codecPolicy": {"candidates": ["tq3", "gzip"]}}"#, key: "codecPolicy.candidates", allowed: "k4v4"),
        Invalid(json: #"{"codecPolicy": {"candidates": []}}"#, key: "codecPolicy.candidates", allowed: "at least one codec"),
        Invalid(json: #"{"codecPolicy": {"samplePages": 0}}"#, key: "codecPolicy.samplePages", allowed: "1...64"),
        Invalid(json: #"{"codecPolicy": {"checkEvery": "often"}}"#, key: "codecPolicy.checkEvery", allowed: "an integer"),
        Invalid(json: #"{"codecPolicy": {"mdoe": "auto"}}"#, key: "codecPolicy.mdoe", allowed: "one of mode, maxAttentionError"),
        Invalid(json: #"{"codecPolicy": 3}"#, key: "codecPolicy", allowed: "\"fixed\", \"auto\", or an object"),
        Invalid(json: #"{"ioQueueDepth": 100000}"#, key: "ioQueueDepth", allowed: "1...4096"),
        Invalid(json: #"{"logLevel": "loud"}"#, key: "logLevel", allowed: "trace, debug, info"),
        Invalid(json: #"{"metricsListen": "nonsense"}"#, key: "metricsListen", allowed: "HOST:PORT"),
        Invalid(json: #"{"metricsListen": "192.0.2.1:9464"}"#, key: "metricsListen", allowed: "unless metricsAllowNonLoopback is true"),
        Invalid(json: #"{"metricsAllowNonLoopback": "yes"}"#, key: "metricsAllowNonLoopback", allowed: "true or false"),
        Invalid(json: #"{"ramBugdet": "8GiB"}"#, key: "ramBugdet", allowed: "one of the keys"),
        Invalid(json: #"{"sharedTenantGroups": ["no-such-group-kvtier"]}"#, key: "sharedTenantGroups", allowed: "groups that exist"),
        Invalid(json: #"{"sharedTenantGroups": "wheel"}"#, key: "sharedTenantGroups", allowed: "a list of group names"),
        Invalid(flags: ["--state-dir", ""], key: "stateDir", allowed: "leave the key out"),
        Invalid(flags: ["--ram-budget", "0"], key: "ramBudget", allowed: "a size such as"),
        Invalid(flags: ["--log-level", "verbose"], key: "logLevel", allowed: "critical"),
        Invalid(flags: ["--metrics-listen", "[2001:db8::1]:9464"], key: "metricsListen", allowed: "loopback"),
    ]

    @Test(arguments: invalid)
    func invalidValuesStopTheDaemonNamingTheKey(_ case_: Invalid) throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        var arguments = [Checkout.daemon!, "--socket", folder.path + "/s.sock"]
        if !case_.flags.contains("--state-dir") { arguments += ["--state-dir", folder.path + "/state"] }
        arguments += case_.flags
        if let json = case_.json { arguments += ["--config", try folder.write("kvtierd.json", json)] }
        let result = try runToCompletion(arguments, timeoutSeconds: 30)
        #expect(result.code != 0, "kvtierd accepted \(case_.testDescription):\n\(result.output)")
        #expect(result.output.contains("configuration key '\(case_.key)'"), "message does not name \(case_.key):\n\(result.output)")
        #expect(result.output.contains(case_.allowed), "message does not say what is allowed:\n\(result.output)")
        #expect(access(folder.path + "/s.sock", F_OK) != 0, "kvtierd started listening despite the error")
    }

    @Test func printConfigShowsFileThenFlags() throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let file = try folder.write("kvtierd.json", #"""
            {"ramBudget": "2GiB", "diskCodec": "tq3m", "logLevel": "debug", "metricsListen": "localhost:9464",
             "pageTokens": 64, "socket": "/tmp/from-file.sock"}
            """#)
        let result = try runToCompletion([Checkout.daemon!, "--config", file, "--ram-budget", "512MiB", "--print-config"])
        #expect(result.code == 0, "\(result.output)")
        let object = try JSONSerialization.jsonObject(with: Data(result.output.utf8)) as? [String: Any]
        #expect(object?["ramBudget"] as? String == "512MiB", "the flag wins over the file")
        #expect(object?["diskCodec"] as? String == "tq3m")
        #expect(object?["logLevel"] as? String == "debug")
        #expect(object?["metricsListen"] as? String == "127.0.0.1:9464")
        #expect(object?["pageTokens"] as? Int == 64)
        #expect(object?["socket"] as? String == "/tmp/from-file.sock")
        #expect(object?["metricsAllowNonLoopback"] as? Bool == false)
        #expect(object?["diskBudget"] is NSNull)
        let policy = object?["codecPolicy"] as? [String: Any]
        #expect(policy?["mode"] as? String == "fixed", "the default policy")
        #expect(policy?["maxAttentionError"] as? Double == 0.15)
    }

    @Test func codecPolicyIsAStringOrAnObjectWithDefaultsForWhatItLeavesOut() throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        for (json, mode, bound, candidates, samplePages) in [
            (#"{"codecPolicy": "auto"}"#, "auto", 0.15, ["fp16", "q8", "k4v4", "tq4", "tq3", "tq3m"], 4),
            (#"{"codecPolicy": {"mode": "auto", "maxAttentionError": 0.05, "candidates": ["tq4", "K4V4+zstd"], "samplePages": 2}}"#,
             "auto", 0.05, ["tq4", "k4v4+zstd"], 2),
        ] {
            let file = try folder.write("kvtierd.json", json)
            let result = try runToCompletion([Checkout.daemon!, "--config", file, "--print-config"])
            #expect(result.code == 0, "\(result.output)")
            let object = try JSONSerialization.jsonObject(with: Data(result.output.utf8)) as? [String: Any]
            let policy = object?["codecPolicy"] as? [String: Any]
            #expect(policy?["mode"] as? String == mode)
            #expect(policy?["maxAttentionError"] as? Double == bound)
            let names = policy?["candidates"] as? [String] ?? []
            #expect(Set(names).isSuperset(of: candidates) && names.count >= candidates.count, "\(names)")
            #expect(policy?["samplePages"] as? Int == samplePages)
            #expect(policy?["checkEvery"] as? Int == 64)
        }
    }

    /// SIGHUP applies logLevel at once and names keys that wait for a restart. The daemon
    /// starts at `warning`, so the reload's own `notice` line is written only if the new level
    /// (`info`) really took effect.
    @Test func sighupReloadsTheLogLevel() async throws {
        let folder = try TemporaryFolder()
        defer { folder.remove() }
        let file = try folder.write("kvtierd.json", #"{"logLevel": "warning", "ramBudget": "64MiB"}"#)
        let daemon = try await startDaemon(in: folder, ["--config", file])
        defer { daemon.stop() }
        #expect(!daemon.log.contains("kvtierd ready"), "info lines written at level warning:\n\(daemon.log)")

        daemon.signal(SIGHUP)
        try await Task.sleep(for: .milliseconds(500))
        #expect(daemon.poll() == nil, "SIGHUP stopped the daemon:\n\(daemon.log)")
        #expect(!daemon.log.contains("configuration reloaded"), "a notice written at level warning:\n\(daemon.log)")

        _ = try folder.write("kvtierd.json", #"{"logLevel": "info", "ramBudget": "128MiB"}"#)
        daemon.signal(SIGHUP)
        #expect(daemon.waitForLog("SIGHUP: configuration reloaded"), "no reload line at the new level:\n\(daemon.log)")
        #expect(daemon.log.contains("applied=logLevel"), "\(daemon.log)")
        // --ram-budget on the command line wins over the file, so ramBudget did not change.
        #expect(daemon.log.contains("needRestart= "), "\(daemon.log)")

        _ = try folder.write("kvtierd.json", #"{"logLevel": "info", "diskCodec": "tq3m"}"#)
        daemon.signal(SIGHUP)
        #expect(daemon.waitForLog("needRestart=diskCodec"), "a changed diskCodec must be reported as needing a restart:\n\(daemon.log)")

        _ = try folder.write("kvtierd.json", #"{"logLevel": "shouting"}"#)
        daemon.signal(SIGHUP)
        #expect(daemon.waitForLog("configuration rejected, keeping the running one"), "\(daemon.log)")
        #expect(daemon.poll() == nil, "a bad reload must not stop the daemon:\n\(daemon.log)")
    }
}
