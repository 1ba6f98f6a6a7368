@preconcurrency import Glibc
import KVTierCore
import KVTierSystem
import SystemPackage

/// The remote tier's secrets, from files or the environment, never from the command line (where
/// `ps` shows them to every user): the deployment key (`remoteKeyFile` or
/// `KVTIER_REMOTE_KEY`) and the Redis password (`remotePasswordFile` or
/// `KVTIER_REMOTE_PASSWORD`).
public enum RemoteSecrets {
    public static let keyEnvironment = "KVTIER_REMOTE_KEY"
    public static let passwordEnvironment = "KVTIER_REMOTE_PASSWORD"
    /// A secret file is small; a larger one is not a secret file.
    static let maxFileBytes = 4096

    public struct Invalid: Error, Sendable, CustomStringConvertible {
        public var reason: String
        public var description: String { reason }
    }

    /// The deployment key: 32 bytes, written as 64 hexadecimal digits (surrounding whitespace
    /// ignored) or as the 32 raw bytes. From `file` when given, else the environment.
    public static func key(file: String?, environment: [String: String]) throws(Invalid) -> DigestKey {
        let text: [UInt8]
        let source: String
        if let file {
            text = try read(file, what: "remoteKeyFile")
            source = file
        } else if let value = environment[keyEnvironment] {
            text = Array(value.utf8)
            source = keyEnvironment
        } else {
            throw Invalid(reason: "the remote tier needs the deployment key, shared by every daemon that uses this Redis: set remoteKeyFile (or \(keyEnvironment)) to 32 random bytes, e.g. made once with `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > /etc/kvtier/remote.key` and copied to each host")
        }
        if text.count == 32, let key = DigestKey(bytes: text) { return key }
        let hex = text.filter { !($0 == 32 || $0 == 10 || $0 == 13 || $0 == 9) }
        guard hex.count == 64, let bytes = decodeHex(hex), let key = DigestKey(bytes: bytes) else {
            throw Invalid(reason: "\(source) must hold 32 bytes: 64 hexadecimal digits, or 32 raw bytes")
        }
        return key
    }

    /// The Redis password, from `file` (one line; a trailing newline is dropped) when given,
    /// else the environment; nil when neither is set (no AUTH).
    public static func password(file: String?, environment: [String: String]) throws(Invalid) -> String? {
        if let file {
            var bytes = try read(file, what: "remotePasswordFile")
            while let last = bytes.last, last == 10 || last == 13 { bytes.removeLast() }
            guard !bytes.isEmpty, !bytes.contains(10), !bytes.contains(13) else {
                throw Invalid(reason: "remotePasswordFile \(file) must hold the password on one line")
            }
            return String(decoding: bytes, as: UTF8.self)
        }
        return environment[passwordEnvironment].flatMap { $0.isEmpty ? nil : $0 }
    }

    /// A secret file's bytes; refused when other users may read or write it.
    static func read(_ path: String, what: String) throws(Invalid) -> [UInt8] {
        let descriptor: FileDescriptor
        do { descriptor = try FileDescriptor.open(path: path, flags: O_RDONLY | O_CLOEXEC) } catch {
            throw Invalid(reason: "\(what) \(path) cannot be opened: \(error)")
        }
        defer { descriptor.closeIgnoringErrors() }
        let status: stat
        do { status = try descriptor.status() } catch { throw Invalid(reason: "\(what) \(path): \(error)") }
        guard status.st_mode & S_IFMT == S_IFREG else { throw Invalid(reason: "\(what) \(path) is not a regular file") }
        guard status.st_mode & 0o007 == 0 else {
            throw Invalid(reason: "\(what) \(path) may be read or written by other users (mode \(String(status.st_mode & 0o777, radix: 8))): chmod o-rwx it")
        }
        var bytes = [UInt8](repeating: 0, count: maxFileBytes + 1)
        let count: Int
        do {
            count = try bytes.withUnsafeMutableBytes { (raw) throws(Errno) in try descriptor.readFully(into: raw, at: 0) }
        } catch {
            throw Invalid(reason: "\(what) \(path) cannot be read: \(error)")
        }
        guard count <= maxFileBytes else { throw Invalid(reason: "\(what) \(path) is larger than \(maxFileBytes) bytes: not a secret file") }
        return Array(bytes[0..<count])
    }

    static func decodeHex(_ digits: [UInt8]) -> [UInt8]? {
        func value(_ c: UInt8) -> UInt8? {
            switch c {
            case 48...57: c - 48
            case 97...102: c - 87
            case 65...70: c - 55
            default: nil
            }
        }
        var bytes: [UInt8] = []
        var i = 0
        while i + 1 < digits.count {
            guard let high = value(digits[i]), let low = value(digits[i + 1]) else { return nil }
            bytes.append(high << 4 | low)
            i += 2
        }
        return i == digits.count ? bytes : nil
    }
}
