import Dispatch
import KVTierCore
import Synchronization

/// Where copies of page records go (the remote tier, through the tiered store), boxed in a struct
/// for the reason `SessionHolds` is: a bare closure in a `Mutex` gains a thunk per access.
struct RecordCopies: Sendable {
    let send: @Sendable ([RecordCopy]) -> Void
}

/// A page record handed to `DiskTier.setRecordCopies`' receiver.
public struct RecordCopy: Sendable {
    public enum Reason: Sendable {
        /// Written with `PageWrite.copyRecord` and now durable.
        case written
        /// About to be deleted by the disk budget or a tenant's disk quota: read back and verified.
        case leaving
    }

    public var address: PageAddress
    /// The record, as encoded (`written`) or as its segment holds it (`leaving`).
    public var record: [UInt8]
    public var reason: Reason
}

extension DiskTier {
    /// Sends `receiver` every page record written with `PageWrite.copyRecord` once it is durable,
    /// and every page record the disk budget or a tenant's disk quota deletes, just before its
    /// tombstone is written. `receiver` runs on the writing task or on the disk writer's queue:
    /// it must only queue the records.
    public func setRecordCopies(_ receiver: (@Sendable ([RecordCopy]) -> Void)?) {
        recordCopies.withLock { $0 = receiver.map { RecordCopies(send: $0) } }
    }

    /// From `write(_ pages:)`: the records written with `copyRecord`, those that are durable.
    func copyWritten(_ pages: [PageWrite], _ records: [Result<[UInt8], DiskTierError>], _ results: [Result<StoredPage, DiskTierError>]) {
        guard pages.contains(where: \.copyRecord), let copies = recordCopies.withLock({ $0 }) else { return }
        var copied: [RecordCopy] = []
        for (i, page) in pages.enumerated() where page.copyRecord {
            guard case .success = results[i], case .success(let record) = records[i] else { continue }
            copied.append(RecordCopy(address: page.address, record: record, reason: .written))
        }
        if !copied.isEmpty { copies.send(copied) }
    }

    /// From the writer's queue, before the budget's tombstones: reads back each page record of
    /// `addresses` and checks it (CRC and tag), so rot on this disk never travels as a fresh
    /// copy. Pages that cannot be read or fail the check are left out (and counted as
    /// checksum failures, as a read would). Synchronous reads, on the writer's queue, which
    /// blocks on fdatasync already.
    func copyRecordsLeaving(_ addresses: [PageAddress]) {
        dispatchPrecondition(condition: .onQueue(writer))
        guard let copies = recordCopies.withLock({ $0 }) else { return }
        let located = state.withLock { s in
            addresses.compactMap { address -> (PageAddress, Location, Segment)? in
                guard let location = s.index[address], let segment = s.segments[location.segment] else { return nil }
                return (address, location, segment)
            }
        }
        var copied: [RecordCopy] = []
        for (address, location, segment) in located {
            var record = [UInt8](repeating: 0, count: location.recordBytes)
            let readable = record.withUnsafeMutableBytes { raw -> Bool in
                guard let got = try? segment.file.read(into: raw, at: location.offset), got == raw.count else { return false }
                guard let header = try? PageRecord.verify(UnsafeRawBufferPointer(raw), format: segment.format) else { return false }
                return header.kind == .page && header.address == address && header.sequence == location.sequence
            }
            if readable {
                copied.append(RecordCopy(address: address, record: record, reason: .leaving))
            } else {
                count { $0.checksumFailures += 1 }
            }
        }
        if !copied.isEmpty { copies.send(copied) }
    }
}
