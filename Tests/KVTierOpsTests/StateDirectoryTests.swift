@preconcurrency import Glibc
import Foundation
import KVTierTestProcess
import Testing

/// Finding 9: kvtierd keeps its state only in a directory of its own. A directory another
/// user created first (or may write) is refused at start with a message saying what to do,
/// and a symbolic link planted in the state directory is never followed.
@Suite(.enabled(if: Checkout.binariesBuilt, Checkout.missingBinaries))
struct StateDirectoryTests {
    /// Starts kvtierd on `stateDir` (socket in `folder`); its exit code and output.
    static func start(stateDir: String, in folder: TemporaryFolder) throws -> (code: Int32, output: String) {
        try runToCompletion([Checkout.daemon!, "--socket", folder.path + "/s.sock", "--state-dir", stateDir, "--ram-budget", "16MiB"],
                            timeoutSeconds: EventWaits.stuckSeconds)
    }

    @Test(.enabled(if: getuid() == 0, "needs root to give a directory to uid 65534"))
    func stateDirectoryOwnedByAnotherUIDIsRefused() throws {
        let folder = try TemporaryFolder("kvtier-trust")
        defer { folder.remove() }
        let state = folder.path + "/state"
        #expect(mkdir(state, 0o700) == 0 && chown(state, 65534, 65534) == 0)
        let result = try Self.start(stateDir: state, in: folder)
        #expect(result.code != 0, "kvtierd ran on a state directory owned by uid 65534:\n\(result.output)")
        #expect(result.output.contains("owned by uid 65534"), "\(result.output)")
        #expect(result.output.contains("--state-dir"), "the message says how to fix it: \(result.output)")
    }

    @Test func stateDirectoryWritableByOthersIsRefused() throws {
        let folder = try TemporaryFolder("kvtier-trust")
        defer { folder.remove() }
        let state = folder.path + "/state"
        #expect(mkdir(state, 0o700) == 0 && chmod(state, 0o777) == 0)
        let result = try Self.start(stateDir: state, in: folder)
        #expect(result.code != 0, "kvtierd ran on a mode 0777 state directory:\n\(result.output)")
        #expect(result.output.contains("writable by group or others (mode 777)"), "\(result.output)")
    }

    @Test func symlinkedStateFileIsRefused() throws {
        let folder = try TemporaryFolder("kvtier-trust")
        defer { folder.remove() }
        let state = folder.path + "/state"
        #expect(mkdir(state, 0o700) == 0)
        let victim = try folder.write("victim", "not kvtierd's\n")
        #expect(symlink(victim, state + "/CATALOG") == 0)
        let result = try Self.start(stateDir: state, in: folder)
        #expect(result.code != 0, "kvtierd followed a symbolic link in its state directory:\n\(result.output)")
        #expect(result.output.contains("symbolic link"), "\(result.output)")
        #expect(try String(contentsOfFile: victim, encoding: .utf8) == "not kvtierd's\n", "the link's target was changed")
    }

    /// The check can pass: a fresh directory of our own is accepted and created 0750.
    @Test func ownFreshStateDirectoryIsAccepted() async throws {
        let folder = try TemporaryFolder("kvtier-trust")
        defer { folder.remove() }
        let daemon = try await startDaemon(in: folder)
        var status = stat()
        #expect(stat(folder.path + "/state", &status) == 0 && status.st_mode & 0o777 == 0o750 && status.st_uid == geteuid())
        daemon.stop()
    }
}
