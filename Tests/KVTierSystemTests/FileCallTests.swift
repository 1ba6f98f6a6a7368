@preconcurrency import Glibc
import KVTierSystem
import SystemPackage
import Testing

@Suite struct FileCallTests {
    @Test func positionalWritesAndReadsRoundTrip() throws {
        var random = SeededGenerator.forTest("positionalWritesAndReadsRoundTrip")
        let directory = try TestDirectory("files")
        let path = "\(directory.path)/data"
        let file = try FileDescriptor.open(path: path, flags: O_RDWR | O_CREAT, mode: 0o600)
        defer { file.closeIgnoringErrors() }
        #expect(fcntl(file.rawValue, F_GETFD) & FD_CLOEXEC != 0, "open adds O_CLOEXEC")
        let bytes = randomBytes(100_000, using: &random)
        try bytes.withUnsafeBytes { raw in try file.writeAll(raw, at: 4096) }
        try file.synchronizeData()
        #expect(try file.status().st_size == 104_096)

        var back = [UInt8](repeating: 0, count: 200_000)
        let count = try back.withUnsafeMutableBytes { raw in try file.readFully(into: raw, at: 4096) }
        #expect(count == bytes.count, "a read past the end stops at the end")
        #expect(Array(back[..<count]) == bytes)

        try file.truncate(to: 10)
        #expect(try file.status().st_size == 10)
        try FileSystem.rename(path, to: "\(directory.path)/renamed")
        #expect(!FileSystem.exists(path) && FileSystem.exists("\(directory.path)/renamed"))
        #expect(try FileSystem.directoryEntries(directory.path) == ["renamed"])
        try FileSystem.synchronizeDirectory(directory.path)
        try FileSystem.unlink("\(directory.path)/renamed")
        #expect(try FileSystem.linkStatus("\(directory.path)/renamed") == nil)
        #expect(throws: Errno.noSuchFileOrDirectory) { try FileSystem.unlink("\(directory.path)/renamed") }
    }

    @Test func makeDirectoryReportsWhetherItCreated() throws {
        let directory = try TestDirectory("mkdir")
        let path = "\(directory.path)/sub"
        #expect(try FileSystem.makeDirectory(path, mode: 0o700))
        #expect(try !FileSystem.makeDirectory(path, mode: 0o700), "already there")
        let status = try #require(try FileSystem.linkStatus(path))
        #expect(status.st_mode & S_IFMT == S_IFDIR && status.st_mode & 0o777 == 0o700)
        try FileSystem.changeMode(path, 0o750)
        #expect(try FileSystem.status(path).st_mode & 0o777 == 0o750)
        rmdir(path)
        #expect(throws: Errno.noSuchFileOrDirectory) { try FileSystem.makeDirectory("\(directory.path)/a/b", mode: 0o700) }
    }

    @Test func flagsAndDuplicates() throws {
        let pipe = try FileDescriptor.nonBlockingPipe()
        defer {
            pipe.readEnd.closeIgnoringErrors()
            pipe.writeEnd.closeIgnoringErrors()
        }
        let duplicate = try pipe.writeEnd.duplicateCloseOnExec()
        #expect(duplicate != pipe.writeEnd)
        #expect(fcntl(duplicate.rawValue, F_GETFD) & FD_CLOEXEC != 0)
        try duplicate.closeReportingErrors()

        let plain = FileDescriptor(rawValue: dup(pipe.readEnd.rawValue))
        defer { plain.closeIgnoringErrors() }
        #expect(fcntl(plain.rawValue, F_GETFD) & FD_CLOEXEC == 0)
        try plain.setCloseOnExec()
        #expect(fcntl(plain.rawValue, F_GETFD) & FD_CLOEXEC != 0)
        #expect(throws: Errno.badFileDescriptor) { _ = try FileDescriptor(rawValue: -1).status() }
    }
}
