import ArgumentParser

@main
struct KVTierCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kvtier",
        abstract: "Inspect, verify and benchmark KVTier caches and codecs.",
        subcommands: [CodecCommand.self, DebugCommand.self, DiskVerifyCommand.self, DiskPagesCommand.self, DiskBenchCommand.self]
    )
}
