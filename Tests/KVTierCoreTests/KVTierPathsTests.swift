import KVTierCore
import Testing

@Suite struct KVTierPathsTests {
    @Test func socketFollowsXDGRuntimeDirThenTheStateDirectory() throws {
        #expect(try KVTierPaths.defaultSocketPath(environment: ["XDG_RUNTIME_DIR": "/run/user/1000"], uid: 1000) == "/run/user/1000/kvtier/kvtierd.sock")
        #expect(try KVTierPaths.defaultSocketPath(environment: [:], uid: 0) == "/run/kvtier/kvtierd.sock", "as systemd/kvtierd.socket")
        #expect(try KVTierPaths.defaultSocketPath(environment: ["XDG_STATE_HOME": "/s"], uid: 0) == "/s/kvtier/kvtierd.sock")
        #expect(try KVTierPaths.defaultSocketPath(environment: ["HOME": "/home/a"], uid: 1000) == "/home/a/.local/state/kvtier/kvtierd.sock")
        #expect(try KVTierPaths.defaultSocketPath(environment: ["XDG_STATE_HOME": "/s", "HOME": "/home/a"], uid: 1000) == "/s/kvtier/kvtierd.sock")
    }

    @Test func stateFollowsXDGStateHomeThenRootThenHome() throws {
        #expect(try KVTierPaths.defaultStateDirectory(environment: ["XDG_STATE_HOME": "/x"], uid: 0) == "/x/kvtier")
        #expect(try KVTierPaths.defaultStateDirectory(environment: [:], uid: 0) == "/var/lib/kvtier")
        #expect(try KVTierPaths.defaultStateDirectory(environment: ["HOME": "/home/b"], uid: 1001) == "/home/b/.local/state/kvtier")
    }

    /// Finding 9: with neither HOME nor the XDG variables both daemon and clients used to fall
    /// back to /tmp/.local/state/kvtier, a path any local user can create first. Now there is
    /// no default: the error names what to set. Root keeps its system paths.
    @Test func noDefaultIntoTmp() throws {
        for environment in [[:], ["HOME": ""], ["HOME": "relative"], ["XDG_STATE_HOME": "", "XDG_RUNTIME_DIR": ""]] as [[String: String]] {
            #expect(throws: KVTierPaths.NoDefault.self) { try KVTierPaths.defaultStateDirectory(environment: environment, uid: 1000) }
            #expect(throws: KVTierPaths.NoDefault.self) { try KVTierPaths.defaultSocketPath(environment: environment, uid: 1000) }
        }
        do {
            _ = try KVTierPaths.defaultStateDirectory(environment: [:], uid: 1000)
        } catch {
            #expect(error.description.contains("HOME") && error.description.contains("--state-dir") && error.description.contains("/tmp"))
        }
        #expect(try KVTierPaths.defaultStateDirectory(environment: [:], uid: 0) == "/var/lib/kvtier")
        #expect(try KVTierPaths.defaultSocketPath(environment: ["XDG_RUNTIME_DIR": "/run/user/1000"], uid: 1000) == "/run/user/1000/kvtier/kvtierd.sock")
    }

    @Test func readsTheRealEnvironment() {
        #expect(try KVTierPaths.currentEnvironment()["PATH"] != nil)
    }
}
