@preconcurrency import Glibc
import KVTierSystem
import SystemPackage

/// The directories kvtierd keeps its state and socket in must be its own: a directory another
/// user owns, or may write, lets that user read the catalog, swap files for symbolic links, or
/// put a socket of theirs where clients look. `prepare` creates what is missing (mkdir -p) and
/// refuses the directory, and every ancestor it created, unless owned by `owner` and writable by
/// no group or other user.
public enum DirectoryTrust {
    public struct Refused: Error, CustomStringConvertible, Equatable {
        public var path: String
        public var reason: String
        public var description: String {
            "refusing \(path): \(reason); use a directory owned by uid \(geteuid()) with no group or other write permission (chown/chmod go-w it), or pass another --state-dir/--socket"
        }
    }

    /// mkdir -p `path` (missing directories get `mode`), then checks `path` (following a
    /// symbolic link, so the directory it names is what is checked) and each directory this
    /// call created.
    public static func prepare(_ path: String, mode: mode_t = 0o700, owner: uid_t = geteuid()) throws(Refused) {
        let path = path.hasPrefix("/") ? path : (FileSystem.currentDirectory() ?? ".") + "/" + path
        var prefix = ""
        var created: [String] = []
        for part in path.split(separator: "/") where part != "." {
            prefix += "/" + part
            do {
                if try FileSystem.makeDirectory(prefix, mode: mode) { created.append(prefix) }
            } catch {
                throw Refused(path: prefix, reason: "mkdir failed: \(error)")
            }
        }
        for directory in created { try check(directory, owner: owner, follow: false) }
        try check(path, owner: owner, follow: true)
    }

    /// Whether `path` is a directory owned by `owner` and not writable by group or others.
    public static func check(_ path: String, owner: uid_t = geteuid(), follow: Bool = true) throws(Refused) {
        let status: stat
        do {
            let found: stat? = follow ? try FileSystem.status(path) : try FileSystem.linkStatus(path)
            guard let found else { throw Errno.noSuchFileOrDirectory }
            status = found
        } catch {
            throw Refused(path: path, reason: "stat failed: \(error)")
        }
        guard status.st_mode & S_IFMT == S_IFDIR else { throw Refused(path: path, reason: "not a directory") }
        guard status.st_uid == owner else {
            throw Refused(path: path, reason: "owned by uid \(status.st_uid), not by uid \(owner) that kvtierd runs as")
        }
        guard status.st_mode & 0o022 == 0 else {
            throw Refused(path: path, reason: "writable by group or others (mode \(String(status.st_mode & 0o7777, radix: 8)))")
        }
    }
}
