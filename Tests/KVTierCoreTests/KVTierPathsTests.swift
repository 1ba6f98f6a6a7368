import KVTierCore
import Testing

@Suite struct KVTierPathsTests {
    @Test func socketFollowsXDGRuntimeDirThenTheStateDirectory() {
        #expect(KVTierPaths.defaultSocketPath(environment: ["XDG_RUNTIME_DIR": "/run/user/1000"], uid: 1000) == "/run/user/1000/kvtier/kvtierd.sock")
        #expect(KVTierPaths.defaultSocketPath(environment: [:], uid: 0) == "/run/kvtier/kvtierd.sock", "as systemd/kvtierd.socket")
        #expect(KVTierPaths.defaultSocketPath(environment: ["XDG_STATE_HOME": "/s"], uid: 0) == "/s/kvtier/kvtierd.sock")
        #expect(KVTierPaths.defaultSocketPath(environment: ["HOME": "/home/a"], uid: 1000) == "/home/a/.local/state/kvtier/kvtierd.sock")
        #expect(KVTierPaths.defaultSocketPath(environment: ["XDG_STATE_HOME": "/s", "HOME": "/home/a"], uid: 1000) == "/s/kvtier/kvtierd.sock")
    }

    @Test func stateFollowsXDGStateHomeThenRootThenHome() {
        #expect(KVTierPaths.defaultStateDirectory(environment: ["XDG_STATE_HOME": "/x"], uid: 0) == "/x/kvtier")
        #expect(KVTierPaths.defaultStateDirectory(environment: [:], uid: 0) == "/var/lib/kvtier")
        #expect(KVTierPaths.defaultStateDirectory(environment: ["HOME": "/home/b"], uid: 1001) == "/home/b/.local/state/kvtier")
    }

    @Test func readsTheRealEnvironment() {
        #expect(KVTierPaths.currentEnvironment()["PATH"] != nil)
    }
}
