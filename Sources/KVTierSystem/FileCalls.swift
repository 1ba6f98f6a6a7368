@preconcurrency import Glibc
import SystemPackage

/// Calls on open files: positional reads and writes carried to completion, sync, size, flags.
extension FileDescriptor {
    /// pwrite(2) until every byte is written at `offset`.
    public func writeAll(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws(Errno) {
        let descriptor = rawValue
        var done = 0
        while done < bytes.count {
            done += try SystemCall.retryingInterrupts {
                Glibc.pwrite(descriptor, bytes.baseAddress! + done, bytes.count - done, off_t(offset + done))
            }
        }
    }

    /// pread(2) until `buffer` is full or the file ends; returns the bytes read.
    public func readFully(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(Errno) -> Int {
        let descriptor = rawValue
        var done = 0
        while done < buffer.count {
            let count = try SystemCall.retryingInterrupts {
                Glibc.pread(descriptor, buffer.baseAddress! + done, buffer.count - done, off_t(offset + done))
            }
            if count == 0 { break }
            done += count
        }
        return done
    }

    /// fdatasync(2): the file's data (and the metadata needed to read it back) is on the device.
    public func synchronizeData() throws(Errno) {
        let descriptor = rawValue
        _ = try SystemCall.retryingInterrupts { fdatasync(descriptor) }
    }

    /// fsync(2): data and all metadata; for directories, after entries were added or renamed.
    public func synchronize() throws(Errno) {
        let descriptor = rawValue
        _ = try SystemCall.retryingInterrupts { fsync(descriptor) }
    }

    /// ftruncate(2).
    public func truncate(to bytes: Int) throws(Errno) {
        let descriptor = rawValue
        _ = try SystemCall.retryingInterrupts { ftruncate(descriptor, off_t(bytes)) }
    }

    /// fstat(2).
    public func status() throws(Errno) -> Glibc.stat {
        let descriptor = rawValue
        var status = Glibc.stat()
        _ = try SystemCall.retryingInterrupts { Glibc.fstat(descriptor, &status) }
        return status
    }

    /// A close-on-exec duplicate (F_DUPFD_CLOEXEC), owned by the caller.
    public func duplicateCloseOnExec() throws(Errno) -> FileDescriptor {
        let descriptor = rawValue
        return FileDescriptor(rawValue: try SystemCall.retryingInterrupts { fcntl(descriptor, F_DUPFD_CLOEXEC, 0) })
    }

    /// Sets FD_CLOEXEC (on a descriptor inherited, not opened, by this process).
    public func setCloseOnExec() throws(Errno) {
        let descriptor = rawValue
        let current = try SystemCall.retryingInterrupts { fcntl(descriptor, F_GETFD) }
        _ = try SystemCall.retryingInterrupts { fcntl(descriptor, F_SETFD, current | FD_CLOEXEC) }
    }

    /// Adds file status flags (O_NONBLOCK) to the open file description.
    public func addStatusFlags(_ flags: Int32) throws(Errno) {
        let descriptor = rawValue
        let current = try SystemCall.retryingInterrupts { fcntl(descriptor, F_GETFL) }
        _ = try SystemCall.retryingInterrupts { fcntl(descriptor, F_SETFL, current | flags) }
    }

    /// Removes file status flags (O_NONBLOCK) from the open file description.
    public func removeStatusFlags(_ flags: Int32) throws(Errno) {
        let descriptor = rawValue
        let current = try SystemCall.retryingInterrupts { fcntl(descriptor, F_GETFL) }
        _ = try SystemCall.retryingInterrupts { fcntl(descriptor, F_SETFL, current & ~flags) }
    }

    /// posix_fadvise(POSIX_FADV_DONTNEED): drops cached pages of the range (`length` 0: to the
    /// end of the file).
    public func dropCachedPages(offset: Int64, length: Int64) throws(Errno) {
        try SystemCall.checkingStatus(posix_fadvise(rawValue, off_t(offset), off_t(length), POSIX_FADV_DONTNEED))
    }

    /// open(2) relative to nothing: `path` with `flags` (O_CLOEXEC is always added) and `mode`
    /// for a file it creates.
    public static func open(path: String, flags: Int32, mode: mode_t = 0) throws(Errno) -> FileDescriptor {
        FileDescriptor(rawValue: try SystemCall.retryingInterrupts { Glibc.open(path, flags | O_CLOEXEC, mode) })
    }
}

/// Calls on paths.
public enum FileSystem {
    /// mkdir(2); false when something already exists at `path` (the caller checks what).
    @discardableResult
    public static func makeDirectory(_ path: String, mode: mode_t) throws(Errno) -> Bool {
        do throws(Errno) {
            _ = try SystemCall.retryingInterrupts { mkdir(path, mode) }
            return true
        } catch where error == .fileExists {
            return false
        }
    }

    /// lstat(2): the entry itself, a symbolic link not followed; nil when nothing is at `path`.
    public static func linkStatus(_ path: String) throws(Errno) -> stat? {
        var status = stat()
        do throws(Errno) {
            _ = try SystemCall.retryingInterrupts { lstat(path, &status) }
            return status
        } catch where error == .noSuchFileOrDirectory {
            return nil
        }
    }

    /// stat(2), following symbolic links.
    public static func status(_ path: String) throws(Errno) -> stat {
        var status = stat()
        _ = try SystemCall.retryingInterrupts { stat(path, &status) }
        return status
    }

    public static func unlink(_ path: String) throws(Errno) {
        _ = try SystemCall.retryingInterrupts { Glibc.unlink(path) }
    }

    /// rename(2): atomically replaces `to`.
    public static func rename(_ from: String, to: String) throws(Errno) {
        _ = try SystemCall.retryingInterrupts { Glibc.rename(from, to) }
    }

    public static func changeMode(_ path: String, _ mode: mode_t) throws(Errno) {
        _ = try SystemCall.retryingInterrupts { chmod(path, mode) }
    }

    /// Whether anything is at `path` (access F_OK, symbolic links followed).
    public static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    /// The names in directory `path`, without "." and "..".
    public static func directoryEntries(_ path: String) throws(Errno) -> [String] {
        guard let handle = opendir(path) else { throw Errno(rawValue: errno) }
        defer { closedir(handle) }
        var names: [String] = []
        while let entry = readdir(handle) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    /// fsync of the directory `path`, so entries created, renamed or removed in it survive a crash.
    public static func synchronizeDirectory(_ path: String) throws(Errno) {
        let directory = try FileDescriptor.open(path: path, flags: O_RDONLY | O_DIRECTORY)
        defer { directory.closeIgnoringErrors() }
        try directory.synchronize()
    }

    /// The current working directory; nil when it cannot be named (removed).
    public static func currentDirectory() -> String? {
        guard let pointer = getcwd(nil, 0) else { return nil }
        defer { free(pointer) }
        return String(cString: pointer)
    }
}
