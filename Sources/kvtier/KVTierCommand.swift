import ArgumentParser

@main
struct KVTierCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kvtier",
        abstract: "Watch a running kvtierd; inspect, verify and benchmark KVTier caches and codecs.",
        subcommands: [StatusCommand.self, TopCommand.self, CodecCommand.self, DebugCommand.self, DiskVerifyCommand.self, DiskPagesCommand.self,
                      DiskBenchCommand.self]
    )
}
