import KVTierCore
import KVTierStore
import KVTierSystem
import Logging
import Synchronization
import SystemPackage

/// The remote tier on Redis or Valkey: each page a string value (`RemoteRecord`) under
/// `<prefix>:t<tenant>:<page key>`, so tenants never share a key and every host's daemon finds
/// the pages of a prefix under the same names.
///
/// Reads (`contains`, `fetch`) borrow one of at most `connections` pooled connections and make
/// one batched request (a pipeline of EXISTS; GETs pipelined a few MiB at a time). Writes are behind the request path:
/// `offer` queues records (bounded by `queueBytes`; what does not fit is dropped), and one writer
/// thread seals them (`RemoteRecord.seal`) and sends them in pipelined SETs with the TTL, then
/// deletes the oldest pages it wrote while they pass `budgetBytes`.
///
/// Failure never reaches a request as an error: a timeout, refused connection or protocol
/// violation closes the connection and marks the tier down; while it is down every call
/// answers misses at once (no system call), and one caller at a time tries again after a
/// back-off that doubles from `minRetryMillis` to `maxRetryMillis`.
public final class RedisRemoteTier: RemoteTier, Sendable {
    public struct Configuration: Sendable {
        public var url: RedisURL
        /// AUTH password (`remotePasswordFile`); nil: no AUTH.
        public var password: String?
        /// The deployment key: values are sealed with it.
        public var key: DigestKey
        /// First part of every key (`remoteKeyPrefix`).
        public var keyPrefix = "kvtier"
        /// Expiry of each page written (`remoteTTLSeconds`); 0: none.
        public var ttlSeconds = 86_400
        /// Most bytes of values this daemon keeps in the store (`remoteBudget`): over it, the
        /// oldest it wrote are deleted. nil: no limit but the TTL (and Redis's own maxmemory).
        public var budgetBytes: Int?
        /// The longest one request (connect, a pipeline, one batch of GETs) may take (`remoteTimeoutMillis`).
        public var timeoutMillis = 250
        /// Most bytes of records waiting for the writer (`remoteQueueBytes`).
        public var queueBytes = 256 << 20
        /// Connections for reads, at most (`remoteConnections`); the writer has one more.
        public var connections = 4
        /// Bytes of fetch buffers kept for reuse.
        public var bufferPoolBytes = 256 << 20
        /// The back-off after a failure, doubling from this to `maxRetryMillis` (tests lengthen it).
        public var minRetryMillis = RedisRemoteTier.minRetryMillis

        public init(url: RedisURL, password: String? = nil, key: DigestKey) {
            self.url = url
            self.password = password
            self.key = key
        }
    }

    /// Back-off after a failure: doubling from this …
    public static let minRetryMillis = 100
    /// … up to this.
    public static let maxRetryMillis = 5_000
    /// Records one pipelined write carries at most, and bytes of values.
    static let writeBatchRecords = 64
    static let writeBatchBytes = 32 << 20
    /// Bytes of values a fetch keeps asked for and not yet read (`RESPConnection.getEach`).
    static let fetchWindowBytes = 4 << 20

    let configuration: Configuration
    let logger: Logger
    let health = Mutex(Health())
    let pool: ConditionLock<Pool>
    let queue: ConditionLock<WriteQueue>
    let counters = Mutex(Counters())
    let buffers: PageBufferPool
    private let writerThread: Mutex<SystemThread?> = Mutex(nil)

    struct Health {
        var up = true
        var failures = 0
        var retryAtNanos: UInt64 = 0
        /// A caller is trying the server again after a back-off.
        var probing = false
        var lastError = ""
        /// Failures since start: a connection made before the latest one is not trusted.
        var failuresSeen = 0
    }

    /// Idle read connections; `open` counts those lent out too.
    struct Pool: @unchecked Sendable {
        // Invariant: connections are touched only under the pool's lock or by the one caller
        // that took them out of it.
        var idle: [RESPConnection] = []
        var open = 0
    }

    struct Counters {
        var probes = 0, fetches = 0, fetchHits = 0, fetchBytes = 0, oversized = 0
        var writes = 0, writeBytes = 0, dropped = 0, writeErrors = 0, deletes = 0
        var failures = 0, reconnects = 0, skipped = 0
        var trackedPages = 0, trackedBytes = 0
    }

    public init(configuration: Configuration, logger: Logger) throws(Errno) {
        self.configuration = configuration
        self.logger = logger
        pool = ConditionLock(Pool())
        queue = ConditionLock(WriteQueue())
        buffers = PageBufferPool(limitBytes: configuration.bufferPoolBytes)
        let thread = try SystemThread(name: "kvt-remote-wr") { [self] in writeLoop() }
        writerThread.withLock { $0 = thread }
    }

    /// Stops the writer after it has sent what is queued (for at most `drainMillis`; the rest is
    /// dropped), and closes every connection. Calls after this answer misses.
    public func shutdown(drainMillis: Int) {
        queue.withLock { q in
            q.stopping = true
            q.drainDeadline = Deadline(millisFromNow: drainMillis)
        }
        queue.broadcast()
        let thread = writerThread.withLock { slot -> SystemThread? in
            defer { slot = nil }
            return slot
        }
        thread?.join()
        health.withLock { h in
            h.up = false
            h.retryAtNanos = .max
        }
        pool.withLock { p in
            p.open -= p.idle.count
            p.idle.removeAll()
        }
    }

    /// The Redis key of a page.
    func redisKey(_ address: PageAddress) -> String {
        "\(configuration.keyPrefix):t\(address.tenant.rawValue):\(address.key)"
    }

    // MARK: RemoteTier

    public func contains(_ addresses: [PageAddress]) -> [Bool] {
        guard !addresses.isEmpty else { return [] }
        counters.withLock { $0.probes += addresses.count }
        let keys = addresses.map(redisKey)
        let found = withConnection { (connection) throws(RESPError) -> [Bool] in
            try connection.send(keys.map { [.text("EXISTS"), .text($0)] })
            var found: [Bool] = []
            for _ in keys { found.append(try connection.readInteger() > 0) }
            return found
        }
        return found ?? Array(repeating: false, count: addresses.count)
    }

    public func fetch(_ addresses: [PageAddress], maxValueBytes: Int) -> [RemoteValue?] {
        guard !addresses.isEmpty else { return [] }
        counters.withLock { $0.fetches += addresses.count }
        let keys = addresses.map(redisKey)
        let buffers = self.buffers
        // Filled buffers by index, outside the exchange: a failure mid-reply gives them back.
        var filled = [PageBuffer?](repeating: nil, count: keys.count)
        let fetched = withConnection { (connection) throws(RESPError) -> [RemoteValue?] in
            var oversized = 0
            // GETs pipelined a few MiB at a time, not one MGET (`RESPConnection.getEach` says why).
            let bulks = try connection.getEach(keys, windowBytes: Self.fetchWindowBytes, maxBytes: maxValueBytes) { index, length in
                let buffer = buffers.take(max(length, 1))
                filled[index] = buffer
                return buffer.bytes
            }
            var values: [RemoteValue?] = []
            for (index, bulk) in bulks.enumerated() {
                switch bulk {
                case .value(let length): values.append(RemoteValue(buffer: filled[index]!, count: length, pool: buffers))
                case .missing: values.append(nil)
                case .skipped:
                    oversized += 1
                    values.append(nil)
                }
            }
            let hits = values.compactMap { $0 }
            counters.withLock { c in
                c.fetchHits += hits.count
                c.fetchBytes += hits.reduce(0) { $0 + $1.count }
                c.oversized += oversized
            }
            return values
        }
        guard let fetched else {
            for buffer in filled { if let buffer { buffers.give(buffer) } }
            return Array(repeating: nil, count: addresses.count)
        }
        return fetched
    }

    public func offer(_ pages: [RemotePageWrite]) {
        guard !pages.isEmpty else { return }
        let (accepted, dropped) = queue.withLock { q -> (Int, Int) in
            guard !q.stopping else { return (0, pages.count) }
            var accepted = 0
            for page in pages {
                guard q.bytes + page.record.count <= configuration.queueBytes else { continue }
                q.items.append(page)
                q.bytes += page.record.count
                accepted += 1
            }
            return (accepted, pages.count - accepted)
        }
        if dropped > 0 { counters.withLock { $0.dropped += dropped } }
        // Broadcast: `drained` waits on the same condition as the writer.
        if accepted > 0 { queue.broadcast() }
    }

    public func status() -> [(name: String, value: UInt64)] {
        let c = counters.withLock { $0 }
        let up = health.withLock { $0.up }
        let queued = queue.withLock { $0.bytes }
        return [
            ("remote_up", up ? 1 : 0), ("remote_pages", UInt64(c.trackedPages)), ("remote_bytes", UInt64(c.trackedBytes)),
            ("remote_queue_bytes", UInt64(queued)), ("remote_probes", UInt64(c.probes)), ("remote_fetches", UInt64(c.fetches)),
            ("remote_fetch_hits", UInt64(c.fetchHits)), ("remote_fetch_bytes", UInt64(c.fetchBytes)),
            ("remote_oversized", UInt64(c.oversized)), ("remote_writes", UInt64(c.writes)),
            ("remote_write_bytes", UInt64(c.writeBytes)), ("remote_writes_dropped", UInt64(c.dropped)),
            ("remote_write_errors", UInt64(c.writeErrors)), ("remote_deletes", UInt64(c.deletes)),
            ("remote_failures", UInt64(c.failures)), ("remote_reconnects", UInt64(c.reconnects)),
            ("remote_skipped", UInt64(c.skipped)),
        ] + (configuration.budgetBytes.map { [("remote_budget_bytes", UInt64($0))] } ?? [])
    }

    /// One PING: whether the server answers now (start-up says so in the log).
    public func probe() -> Bool {
        withConnection { (connection) throws(RESPError) -> Bool in
            try connection.send([[.text("PING")]])
            try connection.readOK("PONG")
            return true
        } ?? false
    }

    /// The last failure, for logs and tests ("" while none).
    public var lastError: String { health.withLock { $0.lastError } }

    // MARK: connections and health

    /// Whether a request may go to the server now: while up, yes; while down, only the one
    /// caller that finds the back-off over (it becomes the probe).
    func admit() -> Bool {
        let now = Deadline(millisFromNow: 0).nanoseconds
        let admitted = health.withLock { h -> Bool in
            if h.up { return true }
            guard !h.probing, now >= h.retryAtNanos else { return false }
            h.probing = true
            return true
        }
        if !admitted { counters.withLock { $0.skipped += 1 } }
        return admitted
    }

    func succeeded() {
        let recovered = health.withLock { h -> Bool in
            defer {
                h.up = true
                h.failures = 0
                h.probing = false
            }
            return !h.up
        }
        if recovered {
            counters.withLock { $0.reconnects += 1 }
            logger.notice("remote tier reachable again", metadata: ["url": "\(configuration.url)"])
        }
    }

    /// Marks the tier down for the back-off; closes the idle connections (the server may have
    /// restarted, and each would fail in turn).
    func failed(_ error: RESPError) {
        let now = Deadline(millisFromNow: 0).nanoseconds
        let first = health.withLock { h -> Bool in
            let wasUp = h.up
            h.up = false
            h.probing = false
            h.failures += 1
            h.failuresSeen += 1
            let backoff = min(max(Self.maxRetryMillis, configuration.minRetryMillis), configuration.minRetryMillis << min(h.failures - 1, 16))
            h.retryAtNanos = now + UInt64(backoff) * 1_000_000
            h.lastError = error.description
            return wasUp
        }
        counters.withLock { $0.failures += 1 }
        let dropped = pool.withLock { p -> [RESPConnection] in
            defer {
                p.open -= p.idle.count
                p.idle.removeAll()
            }
            return p.idle
        }
        _ = dropped
        pool.broadcast()
        if first {
            logger.warning("remote tier unreachable; serving misses until it answers", metadata: [
                "url": "\(configuration.url)", "error": "\(error)", "retryMillis": "\(configuration.minRetryMillis)"])
        }
    }

    /// A new connection, authenticated and on the database, within the timeout.
    func connect() throws(RESPError) -> RESPConnection {
        let connection = try RESPConnection.connect(to: configuration.url.endpoint, timeoutMillis: configuration.timeoutMillis)
        var setup: [[RESPConnection.Argument]] = []
        if let password = configuration.password {
            setup.append([.text("AUTH")] + (configuration.url.username.map { [.text($0)] } ?? []) + [.text(password)])
        }
        if configuration.url.database != 0 { setup.append([.text("SELECT"), .text("\(configuration.url.database)")]) }
        if !setup.isEmpty {
            try connection.send(setup)
            for _ in setup { try connection.readOK() }
        }
        return connection
    }

    /// Runs `body` on a pooled connection within the timeout; nil when the tier is down, no
    /// connection was to be had in time, or the exchange failed (the connection is then closed
    /// and the tier marked down; an error reply only fails this request).
    func withConnection<T>(_ body: (RESPConnection) throws(RESPError) -> T) -> T? {
        guard admit() else { return nil }
        let deadline = Deadline(millisFromNow: configuration.timeoutMillis)
        // An idle connection, or room to open one, or wait for one to come back.
        let slot = pool.withLock(waitingUntil: { !$0.idle.isEmpty || $0.open < configuration.connections }, deadline: deadline) {
            p, ready -> (RESPConnection?, Bool)? in
            guard ready else { return nil }
            if let connection = p.idle.popLast() { return (connection, false) }
            p.open += 1
            return (nil, true)
        }
        guard let (pooled, opening) = slot else {
            // Every connection busy for the whole timeout: a miss, but the server is not down.
            health.withLock { $0.probing = false }
            counters.withLock { $0.skipped += 1 }
            return nil
        }
        let connection: RESPConnection
        do throws(RESPError) {
            if let pooled { connection = pooled } else { connection = try connect() }
        } catch {
            if opening { pool.withLock { $0.open -= 1 } }
            pool.signal()
            failed(error)
            return nil
        }
        connection.expire(inMillis: max(1, Int(deadline.remainingMillis)))
        do {
            let result = try body(connection)
            pool.withLock { $0.idle.append(connection) }
            pool.signal()
            succeeded()
            return result
        } catch .server(let message) {
            // The server answered: the connection is in step and the tier up.
            pool.withLock { $0.idle.append(connection) }
            pool.signal()
            succeeded()
            logger.warning("remote tier refused a request", metadata: ["error": "\(message)"])
            return nil
        } catch {
            pool.withLock { $0.open -= 1 }
            pool.signal()
            failed(error)
            return nil
        }
    }
}
