#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import ArgumentParser
import KVTierCodec
import KVTierCore
import KVTierTools

struct CodecCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "codec",
        abstract: "List, round-trip, benchmark and choose the KV page codecs.",
        subcommands: [List.self, Roundtrip.self, Bench.self, Advise.self]
    )

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List every codec with its bits per element.")

        @Flag(help: "Print a JSON array instead of a table.")
        var json = false

        struct Entry: Codable {
            var name: String
            var tag: UInt32
            var quantizer: String
            var lossless: String
            /// Stored bits per element for a full 256-token page of 8 heads × 128 (before the
            /// lossless stage, which only ever shrinks it).
            var bitsPerElement: Double
            var lossy: Bool
            var headDimRule: String
            var summary: String
        }

        func run() throws {
            let reference = SectionShape(tokens: 256, kvHeads: 8, headDim: 128)
            let entries = Codec.all.map { codec in
                Entry(name: codec.name, tag: codec.tag, quantizer: codec.quantizer.name,
                      lossless: codec.lossless.description,
                      bitsPerElement: codec.quantizer.bitsPerElement(reference), lossy: !codec.isLossless,
                      headDimRule: codec.quantizer.headDimRule, summary: codec.quantizer.summary)
            }
            if json { return try printJSON(entries) }
            printTable(["NAME", "TAG", "BITS/EL", "HEAD DIM", "DESCRIPTION"], entries.map {
                [$0.name, "0x" + String($0.tag, radix: 16), formatDecimal($0.bitsPerElement, places: 3),
                 $0.headDimRule, $0.summary + ($0.lossless == "none" ? "" : ", then \($0.lossless)")]
            })
        }
    }

    struct Roundtrip: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Encode .npy keys/values page by page, decode them, and write the result.",
            discussion: "Inputs are NumPy float16 arrays [tokens, kvHeads, headDim]; outputs have the same shape.")

        @Option(help: "Codec name (see 'kvtier codec list').") var codec: String
        @Option(help: "Keys .npy, float16 [T, H, D].") var keys: String
        @Option(help: "Values .npy, float16 [T, H, D].") var values: String
        @Option(name: .customLong("out-keys"), help: "Where to write the decoded keys.") var outKeys: String
        @Option(name: .customLong("out-values"), help: "Where to write the decoded values.") var outValues: String
        @Option(name: .customLong("page-tokens"), help: "Tokens per page (the last page may be shorter).")
        var pageTokens = Limits.defaultPageTokens
        @Option(help: "Element type of the arrays: float16, or bfloat16 stored as uint16 bit patterns.")
        var dtype = "float16"
        @Option(name: .customLong("out-encoded"), help: "Also write every page's encoded section here, in page order.")
        var outEncoded: String?
        @Flag(help: "Print the report as JSON.") var json = false

        func run() throws {
            let codec = try Codec(name: self.codec)
            guard let elementType = ElementType(name: dtype) else {
                throw ValidationError("--dtype must be float16 or bfloat16, got '\(dtype)'")
            }
            let k = try NumPyArray.read(path: keys)
            let v = try NumPyArray.read(path: values)
            let result = try CodecRoundtrip(codec: codec, pageTokens: pageTokens, elementType: elementType)
                .run(keys: k, values: v, keepEncoded: outEncoded != nil)
            try result.keys.write(path: outKeys)
            try result.values.write(path: outValues)
            if let outEncoded { try writeBytes(result.encoded, path: outEncoded) }
            let r = result.report
            if json { return try printJSON(r) }
            printTable(["CODEC", "PAGES", "ENCODED", "BITS/EL", "K REL ERR", "V REL ERR"], [[
                r.codec, "\(r.pages)", ByteCount(r.encodedBytes).description, formatDecimal(r.bitsPerElement, places: 3),
                formatDecimal(r.keysRelativeError, places: 5), formatDecimal(r.valuesRelativeError, places: 5),
            ]])
        }
    }

    struct Bench: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Single-core encode/decode throughput against memcpy over the same working set.")

        @Option(help: "Codec name (see 'kvtier codec list').") var codec: String
        @Option(name: .customLong("working-set"), help: "fp16 bytes of keys+values to cycle through (≥ 64MiB to leave the cache).")
        var workingSet = "96MiB"
        @Option(help: "Tokens per section.") var tokens = 256
        @Option(help: "KV heads per section.") var heads = 8
        @Option(name: .customLong("head-dim"), help: "Head dimension.") var headDim = 128
        @Option(help: "Timed passes; the fastest counts.") var repetitions = 5
        @Flag(help: "Print the report as JSON.") var json = false

        func run() throws {
            let codec = try Codec(name: self.codec)
            guard let size = ByteCount(parsing: workingSet), size.bytes > 0 else {
                throw ValidationError("--working-set must be a size such as 96MiB, got '\(workingSet)'")
            }
            let shape = SectionShape(tokens: tokens, kvHeads: heads, headDim: headDim)
            let r = try CodecBenchmark(codec: codec, shape: shape, workingSet: size, repetitions: repetitions).run()
            if json { return try printJSON(r) }
            printTable(["CODEC", "BITS/EL", "ENCODE GB/s", "DECODE GB/s", "MEMCPY GB/s", "DEC/MEMCPY", "KERNELS"], [[
                r.codec, formatDecimal(r.bitsPerElement, places: 3), formatDecimal(r.encodeGBps, places: 2),
                formatDecimal(r.decodeGBps, places: 2), formatDecimal(r.memcpyGBps, places: 2),
                formatDecimal(r.decodeVsMemcpy, places: 2), r.kernelLevel,
            ]])
        }
    }

    struct Advise: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Measure every codec's attention error on real K/V and pick the most compact within a bound.",
            discussion: """
                Each codec round-trips the keys and values page by page (as the disk tier stores them); the \
                attention error is ‖O' − O‖ / ‖O‖ of causal softmax(q kᵀ/√d) v over the sampled query \
                positions of every layer and query head, decoded K/V against the originals. Inputs are \
                float16 .npy arrays [tokens, heads, headDim] (one layer) or [layers, tokens, heads, headDim]; \
                repeat --keys/--values/--queries for one file per layer. Without --queries the keys stand in \
                for them (queriesFrom "keys"). Exit status 2 (after the report) when no codec is within the \
                bound. Method: docs/codecs.md.
                """)

        @Option(help: "Keys .npy, float16 [T, KVH, D] or [L, T, KVH, D] (after RoPE); repeat for one file per layer.")
        var keys: [String]
        @Option(help: "Values .npy, same shape as the keys; repeat in the same order.")
        var values: [String]
        @Option(help: "Queries .npy, [T, QH, D] or [L, T, QH, D], QH a multiple of KVH (after RoPE); default: the keys.")
        var queries: [String] = []
        @Option(name: .customLong("max-attention-error"), help: "Largest acceptable attention error, a fraction (0.01 = 1 %).")
        var maxAttentionError: Double
        @Option(name: .customLong("page-tokens"), help: "Tokens per page, as the daemon stores them.")
        var pageTokens = Limits.defaultPageTokens
        @Option(name: .customLong("query-stride"),
                help: "Evaluate every Nth query position back from the last (default: at most \(CodecAdvisor.defaultMaxQueryPositions) per layer).")
        var queryStride: Int?
        @Option(help: "Comma-separated codec names to compare (default: every codec in 'kvtier codec list').")
        var codecs: String?
        @Option(help: "Element type of the arrays: float16, or bfloat16 stored as uint16 bit patterns.")
        var dtype = "float16"
        @Flag(help: "Print the report as JSON.") var json = false

        func run() throws {
            guard let elementType = ElementType(name: dtype) else {
                throw ValidationError("--dtype must be float16 or bfloat16, got '\(dtype)'")
            }
            var options = CodecAdvisor.Options()
            options.pageTokens = pageTokens
            options.queryStride = queryStride
            if let codecs {
                options.codecs = try codecs.split(separator: ",").map { try Codec(name: String($0.filter { !$0.isWhitespace })) }
            }
            let tensors = try AdvisorTensors(
                keys: keys.map(AdvisorTensors.Source.read), values: values.map(AdvisorTensors.Source.read),
                queries: queries.isEmpty ? nil : queries.map(AdvisorTensors.Source.read), elementType: elementType)
            let r = try CodecAdvisor(tensors: tensors, options: options).run(maxAttentionError: maxAttentionError)
            if json {
                try printJSON(r)
            } else {
                print("\(r.layers) layers × \(r.tokens) tokens, \(r.queryHeads) query / \(r.kvHeads) KV heads × \(r.headDim); "
                      + "queries from \(r.queriesFrom), every \(r.queryStride) position(s): \(r.queryPositionsPerLayer) per layer; "
                      + "pages of \(r.pageTokens) tokens")
                printTable(["CODEC", "BITS/EL", "STORED", "ATTN ERR", "K REL ERR", "V REL ERR", "K MAX ABS", "V MAX ABS", ""],
                           r.candidates.map { c in
                    func cell(_ value: Double?, _ places: Int = 5) -> String { value.map { formatDecimal($0, places: places) } ?? "-" }
                    return [c.codec, cell(c.bitsPerElement, 3), cell(c.storedBitsPerElement, 3), cell(c.attentionError),
                            cell(c.keyError), cell(c.valueError), cell(c.keyMaxAbsError, 4), cell(c.valueMaxAbsError, 4),
                            c.skipped.map { "skipped: \($0)" } ?? (c.codec == r.codec ? "<- chosen" : "")]
                })
                print(r.message)
            }
            if r.codec == nil {
                fputs("kvtier codec advise: \(r.message)\n", stderr)
                throw ExitCode(2)
            }
        }
    }
}
