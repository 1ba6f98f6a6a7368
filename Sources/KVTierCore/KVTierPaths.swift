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
///
/// There is no fallback into /tmp: a non-root process with none of `XDG_RUNTIME_DIR`,
/// `XDG_STATE_HOME` and `HOME` (set, absolute) gets `NoDefault`, naming what to set. A shared
/// /tmp path is one any local user can create first, and then read what is kept there.
public enum KVTierPaths {
    /// The system service's socket (systemd/kvtierd.socket, RuntimeDirectory=kvtier).
    public static let systemSocketPath = "/run/kvtier/kvtierd.sock"

    /// No default location can be derived from the environment.
    public struct NoDefault: Error, CustomStringConvertible, Equatable {
        public var what: String
        public var description: String {
            "no default \(what): none of XDG_RUNTIME_DIR, XDG_STATE_HOME and HOME is set to an absolute path, and KVTier never defaults into /tmp (any local user could create it first); set one of them, or pass the path (kvtierd --socket and --state-dir, or the socket path to the client)"
        }
    }

    public static func defaultSocketPath(environment: [String: String] = currentEnvironment(), uid: UInt32 = getuid()) throws(NoDefault) -> String {
        if let runtime = absolute(environment["XDG_RUNTIME_DIR"]) { return "\(runtime)/kvtier/kvtierd.sock" }
        if uid == 0, absolute(environment["XDG_STATE_HOME"]) == nil { return systemSocketPath }
        do {
            return "\(try defaultStateDirectory(environment: environment, uid: uid))/kvtierd.sock"
        } catch {
            throw NoDefault(what: "socket path")
        }
    }

    public static func defaultStateDirectory(environment: [String: String] = currentEnvironment(), uid: UInt32 = getuid()) throws(NoDefault) -> String {
        if let state = absolute(environment["XDG_STATE_HOME"]) { return "\(state)/kvtier" }
        if uid == 0 { return "/var/lib/kvtier" }
        guard let home = absolute(environment["HOME"]) else { throw NoDefault(what: "state directory") }
        return "\(home)/.local/state/kvtier"
    }

    /// `value` when it is an absolute path; an empty or relative one counts as unset (the XDG
    /// base directory specification says to ignore relative paths).
    private static func absolute(_ value: String?) -> String? {
        guard let value, value.hasPrefix("/") else { return nil }
        return value
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
