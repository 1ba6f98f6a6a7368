@preconcurrency import Glibc
import KVTierCore
import KVTierSystem
import SystemPackage

/// A SplitMix64 seeded from `KVTIER_TEST_SEED` when set, otherwise at random; prints the seed.
typealias SeededGenerator = SplitMix64

extension SplitMix64 {
    static func forTest(_ name: String) -> SplitMix64 {
        let seed = getenv("KVTIER_TEST_SEED").flatMap { UInt64(String(cString: $0)) } ?? UInt64.random(in: 0...UInt64.max)
        print("\(name): seed \(seed) (rerun with KVTIER_TEST_SEED=\(seed))")
        return SplitMix64(seed: seed)
    }
}

func randomBytes(_ count: Int, using generator: inout SplitMix64) -> [UInt8] {
    (0..<count).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
}

/// A directory for test files under `.build` (not /tmp, which may be tmpfs); removed with its
/// files when the value goes away.
final class TestDirectory {
    let path: String

    init(_ name: String) throws {
        let packageRoot = String(#filePath.split(separator: "/").dropLast(3).joined(separator: "/"))
        let base = "/\(packageRoot)/.build/kvtier-system-tests"
        try FileSystem.makeDirectory(base, mode: 0o755)
        path = "\(base)/\(name)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileSystem.makeDirectory(path, mode: 0o755)
    }

    /// A directory for sockets: short, under /tmp, since a socket path must fit `sun_path` (107
    /// bytes) whatever the checkout's path.
    init(socketsNamed name: String) throws {
        var template = Array("/tmp/kvt-\(name.prefix(8))-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw Errno(rawValue: errno) }
        path = String(cString: made)
    }

    deinit {
        for name in (try? FileSystem.directoryEntries(path)) ?? [] { try? FileSystem.unlink("\(path)/\(name)") }
        rmdir(path)
    }

    /// Writes `bytes` to a new file and returns its path.
    func file(_ name: String, bytes: [UInt8]) throws -> FilePath {
        let path = "\(self.path)/\(name)"
        let descriptor = try FileDescriptor.open(path: path, flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o600)
        defer { descriptor.closeIgnoringErrors() }
        try bytes.withUnsafeBytes { raw in try descriptor.writeAll(raw, at: 0) }
        return FilePath(path)
    }
}
