import ArgumentParser
import KVTierCodec
import KVTierCore
import KVTierTools

struct CodecCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "codec",
        abstract: "List, round-trip and benchmark the KV page codecs.",
        subcommands: [List.self, Roundtrip.self, Bench.self]
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
        @Flag(help: "Print the report as JSON.") var json = false

        func run() throws {
            let codec = try Codec(name: self.codec)
            guard let elementType = ElementType(name: dtype) else {
                throw ValidationError("--dtype must be float16 or bfloat16, got '\(dtype)'")
            }
            let k = try NumPyArray.read(path: keys)
            let v = try NumPyArray.read(path: values)
            let result = try CodecRoundtrip(codec: codec, pageTokens: pageTokens, elementType: elementType).run(keys: k, values: v)
            try result.keys.write(path: outKeys)
            try result.values.write(path: outValues)
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
}
