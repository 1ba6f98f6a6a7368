import KVTierCore
import Testing

/// The client finds the daemon where the daemon listens by default: both use
/// `KVTierPaths.defaultSocketPath` (KVTierCore). These pin the rules the client relies on; the
/// rule for root without `XDG_RUNTIME_DIR` is the daemon's to choose (KVTierCoreTests pin it).
@Suite struct DefaultPathTests {
    @Test func runtimeDirectoryWins() throws {
        let environment = ["XDG_RUNTIME_DIR": "/run/user/1000", "XDG_STATE_HOME": "/s", "HOME": "/home/a"]
        #expect(try KVTierPaths.defaultSocketPath(environment: environment, uid: 1000) == "/run/user/1000/kvtier/kvtierd.sock")
        #expect(try KVTierPaths.defaultSocketPath(environment: environment, uid: 0) == "/run/user/1000/kvtier/kvtierd.sock")
    }

    @Test func thenTheStateDirectory() throws {
        #expect(try KVTierPaths.defaultSocketPath(environment: ["XDG_STATE_HOME": "/s", "HOME": "/home/a"], uid: 1000) == "/s/kvtier/kvtierd.sock")
        #expect(try KVTierPaths.defaultSocketPath(environment: ["HOME": "/home/a"], uid: 1000) == "/home/a/.local/state/kvtier/kvtierd.sock")
        #expect(try KVTierPaths.defaultSocketPath(environment: ["XDG_RUNTIME_DIR": "", "HOME": "/home/a"], uid: 1000)
                == "/home/a/.local/state/kvtier/kvtierd.sock", "an empty variable counts as unset")
    }
}
