import KVTierCore

/// The remote tier (T3) as the store sees it: page records that daemons on several hosts share
/// through a key-value store (Redis or Valkey: KVTierRemote's `RedisRemoteTier`), by page
/// address. The store knows nothing of the wire; the tier knows nothing of pages beyond
/// `RemoteRecord`.
///
/// A remote tier never fails a request: a store that is down, slow or full answers misses and
/// drops writes, and counts both (`status`). Its calls block on the network for at most its
/// timeout, so they are made from threads of their own (a connection's thread, or the store's
/// `remoteCalls` queue), never from the cooperative pool.
public protocol RemoteTier: AnyObject, Sendable {
    /// Whether the remote store holds each address: one batched request (a pipeline). False for
    /// every address while the store cannot be asked.
    func contains(_ addresses: [PageAddress]) -> [Bool]

    /// The values stored for `addresses`: one batched request (the store asks for at most
    /// `TieredStore.remoteBatchBytes` of them at a time; `maxValueBytes` each at most: a longer
    /// value is a miss, never read into memory), nil
    /// where missing or not to be had. Values are untrusted bytes: the caller opens them with
    /// `RemoteRecord.open`, then hands each back with `RemoteValue.recycle`.
    func fetch(_ addresses: [PageAddress], maxValueBytes: Int) -> [RemoteValue?]

    /// Queues page records (as the disk tier encodes them, `RemoteRecord.seal` makes the
    /// value) to be written behind the request path; returns at once. What does not fit the
    /// tier's queue is dropped and counted: a remote copy is never worth waiting for.
    func offer(_ pages: [RemotePageWrite])

    /// Counters and gauges, named `remote_*` as `kvtier status` shows them.
    func status() -> [(name: String, value: UInt64)]
}

/// A page record for `RemoteTier.offer`.
public struct RemotePageWrite: Sendable {
    public var address: PageAddress
    /// A page record as `PageRecord.encode` makes it or a segment holds it.
    public var record: [UInt8]

    public init(address: PageAddress, record: [UInt8]) {
        self.address = address
        self.record = record
    }
}

/// A value fetched from the remote tier: its first `count` bytes of `buffer`, which came from
/// `pool` and goes back there (`recycle`) once the page is decoded.
public struct RemoteValue: Sendable {
    public var buffer: PageBuffer
    public var count: Int
    let pool: PageBufferPool?

    public init(buffer: PageBuffer, count: Int, pool: PageBufferPool?) {
        precondition(count <= buffer.count, "a remote value longer than its buffer")
        self.buffer = buffer
        self.count = count
        self.pool = pool
    }

    public var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(rebasing: buffer.readOnly[0..<count]) }

    public func recycle() { pool?.give(buffer) }
}

/// Which pages go to the remote tier (`remotePages`); each choice includes the ones before it.
public enum RemotePages: String, Sendable, CaseIterable {
    /// Pages the disk budget (or a tenant's disk quota) deletes: the remote tier keeps what this
    /// host let go, for this host and the others.
    case evicted
    /// Also the pages of durable and session puts, once they are on disk.
    case durable
    /// Every page written to disk (evicted from RAM, durable, sessions, a clean stop's flush).
    case all
}

/// The remote tier the store uses, with the deployment's key and what it sends there.
public struct RemoteAttachment: Sendable {
    public var tier: any RemoteTier
    /// The secret every daemon of the deployment shares: values are sealed and opened with it.
    public var key: DigestKey
    public var pages: RemotePages

    public init(tier: any RemoteTier, key: DigestKey, pages: RemotePages) {
        self.tier = tier
        self.key = key
        self.pages = pages
    }
}
