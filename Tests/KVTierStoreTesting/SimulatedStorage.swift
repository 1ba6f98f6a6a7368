import KVTierCore
import KVTierStore
import Synchronization

/// In-memory `Storage` with POSIX durability semantics and seeded fault injection, after
/// TigerBeetle's testing storage: tests crash it at any point (`crash()` keeps what was synced,
/// tears or drops what was not), fill it (`capacityBytes`), make it fail (`ioErrorRate`) or rot
/// (`corrupt`, `readFlipRate`). The same seed replays the same faults.
public final class SimulatedStorage: Storage {
    public struct Faults: Sendable {
        /// Total bytes all files may hold; a write past it fails with ENOSPC after writing what fit.
        public var capacityBytes: Int = .max
        /// Probability that a write or sync fails with EIO.
        public var ioErrorRate: Double = 0
        /// Probability that a read returns one flipped bit (transient: the stored bytes stay good).
        public var readFlipRate: Double = 0
        public init(capacityBytes: Int = .max, ioErrorRate: Double = 0, readFlipRate: Double = 0) {
            self.capacityBytes = capacityBytes
            self.ioErrorRate = ioErrorRate
            self.readFlipRate = readFlipRate
        }
    }

    final class Inode {
        var data: [UInt8] = []
        var durable: [UInt8] = []
        /// Writes since the last sync, in order: what a crash may tear.
        var unsynced: [(offset: Int, bytes: [UInt8])] = []
        var generation: Int
        init(generation: Int) { self.generation = generation }
    }

    struct State {
        var names: [String: Inode] = [:]
        var durableNames: [String: Inode] = [:]
        var directories: Set<String> = [""]
        var random: SplitMix64
        var faults: Faults
        var generation = 0
        var crashes = 0
    }

    private let state: Mutex<State>
    public let seed: UInt64

    public init(seed: UInt64, faults: Faults = Faults()) {
        self.seed = seed
        state = Mutex(State(random: SplitMix64(seed: seed), faults: faults))
    }

    public var faults: Faults {
        get { state.withLock { $0.faults } }
        set { state.withLock { $0.faults = newValue } }
    }

    public var readPath: String { "simulated (seed \(seed))" }

    /// Simulates power loss: synced contents and names survive; each unsynced write survives
    /// whole, torn at a random 512-byte sector, or not at all. Open files become unusable.
    public func crash() {
        state.withLock { s in
            s.crashes += 1
            s.generation += 1
            var seen = Set<ObjectIdentifier>()
            for inode in s.names.values.map({ $0 }) + s.durableNames.values.map({ $0 }) where seen.insert(ObjectIdentifier(inode)).inserted {
                var survived = inode.durable
                for write in inode.unsynced {
                    let roll = s.random.next() % 3
                    let kept: Int
                    switch roll {
                    case 0: kept = write.bytes.count
                    case 1: kept = min(write.bytes.count, Int(s.random.next() % UInt64(write.bytes.count / 512 + 1)) * 512)
                    default: kept = 0
                    }
                    if kept == 0 { continue }
                    if survived.count < write.offset + kept {
                        survived += [UInt8](repeating: 0, count: write.offset + kept - survived.count)
                    }
                    survived.replaceSubrange(write.offset..<write.offset + kept, with: write.bytes[0..<kept])
                }
                inode.data = survived
                inode.durable = survived
                inode.unsynced = []
                inode.generation = s.generation
            }
            s.names = s.durableNames
        }
    }

    /// Flips one bit of stored (and synced) data: persistent damage, as bit rot would be.
    public func corrupt(_ path: String, at offset: Int, bit: Int = 0) {
        state.withLock { s in
            guard let inode = s.names[path], offset < inode.data.count else { return }
            inode.data[offset] ^= UInt8(1 << (bit & 7))
            if offset < inode.durable.count { inode.durable[offset] ^= UInt8(1 << (bit & 7)) }
        }
    }

    /// Bytes held by all files now.
    public var usedBytes: Int { state.withLock { Self.used($0) } }

    static func used(_ s: State) -> Int {
        var seen = Set<ObjectIdentifier>()
        return s.names.values.filter { seen.insert(ObjectIdentifier($0)).inserted }.reduce(0) { $0 + $1.data.count }
    }

    static func parent(_ path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "" }
        return String(path[..<slash])
    }

    public func makeDirectory(_ path: String) throws(StorageError) {
        state.withLock { s in
            var prefix = ""
            for part in path.split(separator: "/") {
                prefix = prefix.isEmpty ? String(part) : prefix + "/" + part
                s.directories.insert(prefix)
            }
        }
    }

    public func list(_ directory: String) throws(StorageError) -> [String] {
        let result: [String]? = state.withLock { s in
            guard s.directories.contains(directory) else { return nil }
            let prefix = directory.isEmpty ? "" : directory + "/"
            var names = s.names.keys.filter { $0.hasPrefix(prefix) && !$0.dropFirst(prefix.count).contains("/") }
                .map { String($0.dropFirst(prefix.count)) }
            names += s.directories.filter { $0.hasPrefix(prefix) && $0 != directory && !$0.dropFirst(prefix.count).contains("/") }
                .map { String($0.dropFirst(prefix.count)) }
            return names
        }
        guard let result else { throw StorageError(.notFound, "list", directory) }
        return result
    }

    public func exists(_ path: String) -> Bool { state.withLock { $0.names[path] != nil || $0.directories.contains(path) } }

    public func open(_ path: String, _ mode: OpenMode) throws(StorageError) -> any StorageFile {
        let outcome: Result<SimulatedFile, StorageError> = state.withLock { s in
            if let inode = s.names[path] { return .success(SimulatedFile(storage: self, inode: inode, path: path, generation: inode.generation)) }
            guard mode == .readWriteCreate else { return .failure(StorageError(.notFound, "open", path)) }
            guard s.directories.contains(Self.parent(path)) else { return .failure(StorageError(.notFound, "open", path)) }
            let inode = Inode(generation: s.generation)
            s.names[path] = inode
            return .success(SimulatedFile(storage: self, inode: inode, path: path, generation: inode.generation))
        }
        return try outcome.get()
    }

    public func rename(_ from: String, _ to: String) throws(StorageError) {
        let ok = state.withLock { s -> Bool in
            guard let inode = s.names.removeValue(forKey: from) else { return false }
            s.names[to] = inode
            return true
        }
        if !ok { throw StorageError(.notFound, "rename", from) }
    }

    public func remove(_ path: String) throws(StorageError) {
        let ok = state.withLock { s in s.names.removeValue(forKey: path) != nil }
        if !ok { throw StorageError(.notFound, "remove", path) }
    }

    public func syncDirectory(_ directory: String) throws(StorageError) {
        let failed = state.withLock { s -> Bool in
            if s.random.chance(s.faults.ioErrorRate) { return true }
            for (name, _) in s.durableNames where Self.parent(name) == directory && s.names[name] == nil {
                s.durableNames[name] = nil
            }
            for (name, inode) in s.names where Self.parent(name) == directory { s.durableNames[name] = inode }
            return false
        }
        if failed { throw StorageError(.io, "fsync directory", directory) }
    }

    public func read(_ requests: [BlockRead]) async -> [Result<Int, StorageError>] {
        requests.map { request in
            Result { () throws(StorageError) -> Int in try request.file.read(into: request.destination, at: request.offset) }
        }
    }

    // MARK: file operations, called by SimulatedFile

    func write(_ inode: Inode, _ path: String, _ generation: Int, _ bytes: UnsafeRawBufferPointer, at offset: Int) throws(StorageError) {
        let outcome: StorageError? = state.withLock { s in
            guard generation == inode.generation else { return StorageError(.closed, "write", path) }
            if s.random.chance(s.faults.ioErrorRate) { return StorageError(.io, "write", path) }
            let growth = max(0, offset + bytes.count - inode.data.count)
            let room = s.faults.capacityBytes == .max ? Int.max : max(0, s.faults.capacityBytes - Self.used(s))
            let written = growth <= room ? bytes.count : max(0, bytes.count - (growth - room))
            if offset + written > inode.data.count {
                inode.data += [UInt8](repeating: 0, count: offset + written - inode.data.count)
            }
            if written > 0 {
                inode.data.replaceSubrange(offset..<offset + written, with: bytes[0..<written])
                inode.unsynced.append((offset, Array(bytes[0..<written])))
            }
            return written < bytes.count ? StorageError(.noSpace, "write", path) : nil
        }
        if let outcome { throw outcome }
    }

    func read(_ inode: Inode, _ path: String, _ generation: Int, into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(StorageError) -> Int {
        let outcome: Result<Int, StorageError> = state.withLock { s in
            guard generation == inode.generation else { return .failure(StorageError(.closed, "read", path)) }
            let available = max(0, min(buffer.count, inode.data.count - offset))
            if available > 0 {
                inode.data.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: buffer[0..<available]).copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[offset..<offset + available])) }
                if s.random.chance(s.faults.readFlipRate) {
                    buffer[Int(s.random.next() % UInt64(available))] ^= UInt8(1 << (s.random.next() % 8))
                }
            }
            return .success(available)
        }
        return try outcome.get()
    }

    func sync(_ inode: Inode, _ path: String, _ generation: Int) throws(StorageError) {
        let outcome: StorageError? = state.withLock { s in
            guard generation == inode.generation else { return StorageError(.closed, "fdatasync", path) }
            if s.random.chance(s.faults.ioErrorRate) { return StorageError(.io, "fdatasync", path) }
            inode.durable = inode.data
            inode.unsynced = []
            return nil
        }
        if let outcome { throw outcome }
    }

    func truncate(_ inode: Inode, _ path: String, _ generation: Int, to size: Int) throws(StorageError) {
        let outcome: StorageError? = state.withLock { s in
            guard generation == inode.generation else { return StorageError(.closed, "ftruncate", path) }
            if size < inode.data.count { inode.data.removeLast(inode.data.count - size) } else {
                inode.data += [UInt8](repeating: 0, count: size - inode.data.count)
            }
            // Truncation is metadata: durable at the next sync, like the data.
            inode.unsynced.append((0, []))
            return nil
        }
        if let outcome { throw outcome }
    }

    func size(_ inode: Inode) -> Int { state.withLock { _ in inode.data.count } }
}

/// An open file of `SimulatedStorage`.
final class SimulatedFile: StorageFile, @unchecked Sendable {
    // Invariant: every access to `inode` goes through the storage's mutex.
    let storage: SimulatedStorage
    let inode: SimulatedStorage.Inode
    let path: String
    let generation: Int

    init(storage: SimulatedStorage, inode: SimulatedStorage.Inode, path: String, generation: Int) {
        self.storage = storage
        self.inode = inode
        self.path = path
        self.generation = generation
    }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws(StorageError) {
        try storage.write(inode, path, generation, bytes, at: offset)
    }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(StorageError) -> Int {
        try storage.read(inode, path, generation, into: buffer, at: offset)
    }
    func sync() throws(StorageError) { try storage.sync(inode, path, generation) }
    func truncate(to size: Int) throws(StorageError) { try storage.truncate(inode, path, generation, to: size) }
    func size() throws(StorageError) -> Int { storage.size(inode) }
    func close() {}
}
