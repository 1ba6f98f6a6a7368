import ArgumentParser

@main
struct KVTierCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kvtier",
        abstract: "Inspect, verify and benchmark KVTier caches and codecs.",
        subcommands: [CodecCommand.self]
    )
}
