import KVTierCore
import KVTierStore
import KVTierStoreTesting
import Synchronization
import Testing

/// Compaction must not hold a whole segment's live records in memory: the 64-client soak's
/// daemon grew by hundreds of MB of anonymous memory, one step per compaction of a 256 MiB
/// segment, because glibc keeps such a peak in the writer thread's arena after it is freed.
@Suite struct CompactionMemoryTests {
    @Test func compactionCopiesASegmentGroupByGroup() async throws {
        let storage = ReadsBetweenSyncsStorage(SimulatedStorage(seed: 21))
        var configuration = smallSegments()
        configuration.segmentBytes = 256 << 10
        configuration.maxGroupRecords = 4
        let tier = try DiskTier(storage: storage, configuration: configuration, logger: quietLogger)
        let pages = 120
        for n in 0..<pages { try await write(tier, TestPage(number: UInt64(n))) }
        for n in 0..<pages where n % 4 == 0 { try await tier.delete(TestPage(number: UInt64(n)).address) }
        let largestRecord = tier.pages().map(\.diskBytes).max() ?? 0
        let liveInLargestSegment = Dictionary(grouping: tier.pages(), by: \.segment).values.map(\.count).max() ?? 0
        #expect(liveInLargestSegment > 2 * configuration.maxGroupRecords, "the test needs segments with more live pages than a group")

        storage.resetPeak()
        await tier.compact()
        #expect(tier.stats.compactions > 0)
        let bound = configuration.maxGroupRecords * largestRecord
        #expect(storage.peakBytesReadBetweenSyncs <= bound, """
            compaction read \(storage.peakBytesReadBetweenSyncs) bytes before syncing any copy; a group is at most \(bound) \
            (\(configuration.maxGroupRecords) records of up to \(largestRecord) bytes; \(liveInLargestSegment) live in one segment)
            """)
        for n in 0..<pages { #expect(tier.contains(TestPage(number: UInt64(n)).address) == (n % 4 != 0), "page \(n)") }
        for n in stride(from: 1, to: pages, by: 7) where n % 4 != 0 { #expect(await readsBack(tier, TestPage(number: UInt64(n))), "page \(n)") }
        await tier.close()

        let reopened = try DiskTier(storage: storage, configuration: configuration, logger: quietLogger)
        #expect(reopened.pages().count == pages - pages / 4)
        for n in stride(from: 1, to: pages, by: 7) where n % 4 != 0 { #expect(await readsBack(reopened, TestPage(number: UInt64(n))), "page \(n) after reopening") }
    }
}

/// Storage that counts the bytes read through its files since the last sync of any of them.
/// Compaction reads records and then syncs their copies, so the peak is what it held at once.
final class ReadsBetweenSyncsStorage: Storage {
    struct Counts {
        var sinceSync = 0
        var peak = 0
    }

    let base: SimulatedStorage
    let counts = Mutex(Counts())

    init(_ base: SimulatedStorage) { self.base = base }

    var peakBytesReadBetweenSyncs: Int { counts.withLock { $0.peak } }

    func resetPeak() { counts.withLock { $0 = Counts() } }

    func read(_ bytes: Int) {
        counts.withLock { c in
            c.sinceSync += bytes
            c.peak = max(c.peak, c.sinceSync)
        }
    }

    func synced() { counts.withLock { $0.sinceSync = 0 } }

    func makeDirectory(_ path: String) throws(StorageError) { try base.makeDirectory(path) }
    func list(_ directory: String) throws(StorageError) -> [String] { try base.list(directory) }
    func open(_ path: String, _ mode: OpenMode) throws(StorageError) -> any StorageFile { CountedFile(try base.open(path, mode), self) }
    func exists(_ path: String) -> Bool { base.exists(path) }
    func rename(_ from: String, _ to: String) throws(StorageError) { try base.rename(from, to) }
    func remove(_ path: String) throws(StorageError) { try base.remove(path) }
    func syncDirectory(_ directory: String) throws(StorageError) { try base.syncDirectory(directory) }
    func read(_ requests: [BlockRead]) async -> [Result<Int, StorageError>] { await base.read(requests) }
    var readPath: String { base.readPath }
}

final class CountedFile: StorageFile {
    let file: any StorageFile
    let storage: ReadsBetweenSyncsStorage

    init(_ file: any StorageFile, _ storage: ReadsBetweenSyncsStorage) {
        self.file = file
        self.storage = storage
    }

    var path: String { file.path }
    func write(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws(StorageError) { try file.write(bytes, at: offset) }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(StorageError) -> Int {
        let got = try file.read(into: buffer, at: offset)
        storage.read(got)
        return got
    }
    func sync() throws(StorageError) {
        try file.sync()
        storage.synced()
    }
    func truncate(to size: Int) throws(StorageError) { try file.truncate(to: size) }
    func size() throws(StorageError) -> Int { try file.size() }
    func close() { file.close() }
}
