import ArgumentParser
import KVTierBuildInfo

@main
struct KVTierCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kvtier",
        abstract: "Watch and manage a running kvtierd (sessions, pages, eviction, export); inspect, verify and benchmark KVTier caches and codecs.",
        version: BuildInfo.version,
        subcommands: [StatusCommand.self, TopCommand.self, SessionsCommand.self, PagesCommand.self, ExplainCommand.self, EvictCommand.self,
                      ExportCommand.self, ImportCommand.self, CodecCommand.self, DebugCommand.self, DiskVerifyCommand.self,
                      DiskBenchCommand.self]
    )
}
