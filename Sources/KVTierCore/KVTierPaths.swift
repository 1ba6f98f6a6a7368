#if canImport(Glibc)
@preconcurrency import Glibc
#endif

/// Where kvtierd and its clients meet and where state lives, by default. One definition, so a
/// client with no configuration finds a daemon started with none.
///
/// - socket: `$XDG_RUNTIME_DIR/kvtier/kvtierd.sock`; as root without `XDG_RUNTIME_DIR` and
///   `XDG_STATE_HOME`, `/run/kvtier/kvtierd.sock` (where systemd/kvtierd.socket puts it); else
///   `<state directory>/kvtierd.sock`.
/// - state: `$XDG_STATE_HOME/kvtier`, else `$HOME/.local/state/kvtier`; as root without
///   `XDG_STATE_HOME`, `/var/lib/kvtier`.
public enum KVTierPaths {
    /// The system service's socket (systemd/kvtierd.socket, RuntimeDirectory=kvtier).
    public static let systemSocketPath = "/run/kvtier/kvtierd.sock"

    public static func defaultSocketPath(environment: [String: String] = currentEnvironment(), uid: UInt32 = getuid()) -> String {
        if let runtime = environment["XDG_RUNTIME_DIR"], !runtime.isEmpty { return "\(runtime)/kvtier/kvtierd.sock" }
        if uid == 0, (environment["XDG_STATE_HOME"] ?? "").isEmpty { return systemSocketPath }
        return "\(defaultStateDirectory(environment: environment, uid: uid))/kvtierd.sock"
    }

    public static func defaultStateDirectory(environment: [String: String] = currentEnvironment(), uid: UInt32 = getuid()) -> String {
        if let state = environment["XDG_STATE_HOME"], !state.isEmpty { return "\(state)/kvtier" }
        if uid == 0 { return "/var/lib/kvtier" }
        let home = environment["HOME"].flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp"
        return "\(home)/.local/state/kvtier"
    }

    /// The process environment as a dictionary.
    public static func currentEnvironment() -> [String: String] {
        var result: [String: String] = [:]
        var entry = environ
        while let pointer = entry.pointee {
            let text = String(cString: pointer)
            if let equals = text.firstIndex(of: "=") {
                result[String(text[..<equals])] = String(text[text.index(after: equals)...])
            }
            entry += 1
        }
        return result
    }
}
