import Foundation
import PackagePlugin

/// Writes the version `kvtierd --version` and `kvtier --version` print into the target's
/// sources before every build, from `git describe` (scripts/version). A prebuild command, not a
/// build command: the version depends on the repository's state, which no input file declares,
/// so only running it each time keeps it true; the script rewrites its file only when the
/// version changed, so an unchanged version recompiles nothing.
@main
struct BuildVersion: BuildToolPlugin {
    func createBuildCommands(context: PluginContext, target: Target) throws -> [Command] {
        let generated = context.pluginWorkDirectoryURL.appending(path: "generated")
        let script = context.package.directoryURL.appending(path: "scripts/version")
        return [
            .prebuildCommand(
                displayName: "Version from git describe (scripts/version)",
                executable: URL(fileURLWithPath: "/bin/sh"),
                arguments: [script.path, "--swift", generated.appending(path: "GitVersion.swift").path],
                outputFilesDirectory: generated)
        ]
    }
}
