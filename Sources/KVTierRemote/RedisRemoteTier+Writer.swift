import KVTierCore
import KVTierStore
import KVTierSystem
import Synchronization

/// Records waiting for the writer thread.
struct WriteQueue: Sendable {
    var items: [RemotePageWrite] = []
    var bytes = 0
    var stopping = false
    /// The writer is sending a batch it took.
    var writing = false
    /// After `shutdown`: what is still queued then is sent until this passes.
    var drainDeadline: Deadline?
}

/// The pages this daemon wrote and still counts against `remoteBudget`, oldest first. A page
/// written again moves to the back (its old entry is skipped when reached); one past its TTL
/// is forgotten (Redis expired it).
struct WrittenPages {
    private var order: [(key: String, generation: UInt64)] = []
    private var first = 0
    private var live: [String: (bytes: Int, generation: UInt64, writtenNanos: UInt64)] = [:]
    private var nextGeneration: UInt64 = 0
    private(set) var bytes = 0
    var count: Int { live.count }

    mutating func record(_ key: String, bytes: Int, now: UInt64) {
        if let old = live[key] { self.bytes -= old.bytes }
        nextGeneration += 1
        live[key] = (bytes, nextGeneration, now)
        order.append((key, nextGeneration))
        self.bytes += bytes
    }

    /// The oldest live page, taken out of the count; nil when none is left.
    mutating func popOldest() -> String? {
        while first < order.count {
            let (key, generation) = order[first]
            first += 1
            compact()
            if let entry = live[key], entry.generation == generation {
                live[key] = nil
                bytes -= entry.bytes
                return key
            }
        }
        return nil
    }

    /// Forgets pages written before `cutoff` (their TTL has run out).
    mutating func forget(writtenBefore cutoff: UInt64) {
        while first < order.count {
            let (key, generation) = order[first]
            guard let entry = live[key], entry.generation == generation else {
                first += 1
                continue
            }
            guard entry.writtenNanos < cutoff else { break }
            live[key] = nil
            bytes -= entry.bytes
            first += 1
        }
        compact()
    }

    private mutating func compact() {
        if first > 4096 && first * 2 > order.count {
            order.removeFirst(first)
            first = 0
        }
    }
}

extension RedisRemoteTier {
    /// Waits until every record offered so far has been written or dropped (or `timeoutMillis`
    /// passes); whether it was.
    public func drained(timeoutMillis: Int) -> Bool {
        queue.withLock(waitingUntil: { $0.items.isEmpty && !$0.writing }, deadline: Deadline(millisFromNow: timeoutMillis)) { _, done in done }
    }

    /// The writer thread: takes batches off the queue, seals them, sends them as one pipeline
    /// of SETs, then keeps this daemon's pages within the budget. While the tier is down, batches
    /// are dropped (counted) rather than held: a remote copy is never worth waiting for.
    func writeLoop() {
        var connection: (link: RESPConnection, generation: Int)?
        var written = WrittenPages()
        while true {
            let (batch, stopping) = queue.withLock(waitingUntil: { !$0.items.isEmpty || $0.stopping }) { q -> ([RemotePageWrite], Bool) in
                if q.stopping, q.drainDeadline?.passed ?? true {
                    let left = q.items.count
                    q.items.removeAll()
                    q.bytes = 0
                    if left > 0 { counters.withLock { $0.dropped += left } }
                    return ([], true)
                }
                var taken = 0, bytes = 0
                while taken < q.items.count, taken < Self.writeBatchRecords, taken == 0 || bytes + q.items[taken].record.count <= Self.writeBatchBytes {
                    bytes += q.items[taken].record.count
                    taken += 1
                }
                let batch = Array(q.items.prefix(taken))
                q.items.removeFirst(taken)
                q.bytes -= bytes
                q.writing = !batch.isEmpty
                return (batch, q.stopping && q.items.isEmpty)
            }
            if !batch.isEmpty {
                write(batch, &connection, &written)
                queue.withLock { $0.writing = false }
                queue.broadcast()
            }
            if stopping { break }
        }
        connection = nil
    }

    private func write(_ batch: [RemotePageWrite], _ connection: inout (link: RESPConnection, generation: Int)?, _ written: inout WrittenPages) {
        guard admit() else {
            counters.withLock { $0.dropped += batch.count }
            return
        }
        let sealed = batch.compactMap { page -> (key: String, value: [UInt8])? in
            guard let value = page.record.withUnsafeBytes({ RemoteRecord.seal($0, key: configuration.key) }) else { return nil }
            return (redisKey(page.address), value)
        }
        let now = Deadline(millisFromNow: 0).nanoseconds
        do throws(RESPError) {
            // A failure seen by anyone since this connection was made (the server restarted,
            // say) makes it suspect: a new one costs a connect, a dead one a lost batch.
            let generation = health.withLock { $0.failuresSeen }
            if connection?.generation != generation { connection = (try connect(), generation) }
            let link = connection!.link
            // Large batches take longer to send than a probe: the timeout runs per 8 MiB.
            link.expire(inMillis: configuration.timeoutMillis * (1 + sealed.reduce(0) { $0 + $1.value.count } / (8 << 20)))
            try withArguments(sealed) { commands throws(RESPError) in try link.send(commands) }
            var stored = 0, storedBytes = 0, refused = 0
            for page in sealed {
                do throws(RESPError) {
                    try link.readOK()
                    written.record(page.key, bytes: page.value.count, now: now)
                    stored += 1
                    storedBytes += page.value.count
                } catch .server(let message) {
                    // Full (maxmemory with noeviction), read-only replica, ACL: this page only.
                    refused += 1
                    if refused == 1 { logger.warning("remote tier refused a page write", metadata: ["error": "\(message)"]) }
                }
            }
            try trimToBudget(link, &written)
            let tracked = written
            counters.withLock { c in
                c.writes += stored
                c.writeBytes += storedBytes
                c.writeErrors += refused
                c.trackedPages = tracked.count
                c.trackedBytes = tracked.bytes
            }
            succeeded()
        } catch {
            connection = nil
            counters.withLock { $0.dropped += batch.count }
            failed(error)
        }
    }

    /// SET key value [PX ttl] for each page, the values lent without a copy.
    private func withArguments(_ pages: [(key: String, value: [UInt8])],
                               _ body: ([[RESPConnection.Argument]]) throws(RESPError) -> Void) throws(RESPError) {
        let ttl = configuration.ttlSeconds > 0 ? [RESPConnection.Argument.text("PX"), .text("\(configuration.ttlSeconds * 1000)")] : []
        func nest(_ index: Int, _ commands: [[RESPConnection.Argument]]) throws(RESPError) {
            guard index < pages.count else { return try body(commands) }
            try lend(pages[index].value) { (value) throws(RESPError) in
                try nest(index + 1, commands + [[.text("SET"), .text(pages[index].key), .bytes(value)] + ttl])
            }
        }
        try nest(0, [])
    }

    /// Forgets pages past their TTL, then deletes the oldest this daemon wrote while it holds
    /// more than `budgetBytes` (one pipeline of DEL).
    private func trimToBudget(_ connection: RESPConnection, _ written: inout WrittenPages) throws(RESPError) {
        let now = Deadline(millisFromNow: 0).nanoseconds
        let ttlNanos = UInt64(configuration.ttlSeconds) * 1_000_000_000
        if configuration.ttlSeconds > 0, now > ttlNanos {
            written.forget(writtenBefore: now - ttlNanos)
        }
        guard let budget = configuration.budgetBytes, written.bytes > budget else { return }
        var doomed: [String] = []
        while written.bytes > budget, let key = written.popOldest() { doomed.append(key) }
        guard !doomed.isEmpty else { return }
        try connection.send(doomed.map { [.text("DEL"), .text($0)] })
        for _ in doomed { _ = try connection.readInteger() }
        counters.withLock { $0.deletes += doomed.count }
    }
}
