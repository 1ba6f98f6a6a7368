@preconcurrency import Glibc
import KVTierSystem
import Logging
import SystemPackage

/// Reads with `pread` on a bounded pool of threads: the fallback where io_uring is unavailable.
///
/// Same semantics as `URingReader`: requests of a batch run in parallel on up to `threads`
/// threads, short reads continue until end of file, EINTR is retried, and the caller resumes when
/// the whole batch is done. Unlike io_uring, a running pread cannot be cancelled: `close` waits
/// for reads already under way, which on regular files is a bounded wait.
public final class PreadReader: BlockReader {
    public let path: IOPath
    private let pool: PreadPool

    /// Starts the threads.
    /// - Parameter threads: clamped to `1...IOLimits.maxPreadThreads`. Default
    ///   `IOLimits.defaultPreadThreads` (4).
    /// - Throws: the `pthread_create` error when a thread cannot be started.
    public convenience init(threads: Int = IOLimits.defaultPreadThreads, logger: Logger) throws(Errno) {
        try self.init(threads: threads, logger: logger, maxBytesPerCall: IOLimits.maxBytesPerCall)
    }

    /// `maxBytesPerCall` below the default lets tests force reads in several calls.
    init(threads: Int, logger: Logger, maxBytesPerCall: Int) throws(Errno) {
        let count = min(max(threads, 1), IOLimits.maxPreadThreads)
        let pool = PreadPool(maxBytesPerCall: max(1, maxBytesPerCall), logger: logger)
        try pool.start(threads: count)
        self.pool = pool
        self.path = .preadPool(threads: count)
    }

    deinit { pool.close() }

    public func read(_ batch: [ReadRequest]) async -> [ReadCompletion] {
        guard !batch.isEmpty else { return [] }
        return await withCheckedContinuation { continuation in
            pool.start(batch, continuation: continuation)
        }
    }

    public func close() { pool.close() }
}

/// The threads and the queue they take work from; all mutable state is behind its two locks.
private final class PreadPool: Sendable {
    struct State {
        var waiting = FIFO<ReadOperation>()
        var batches: [UInt64: BatchState] = [:]
        var nextBatch: UInt64 = 0
        var closing = false
    }

    typealias Resumption = (CheckedContinuation<[ReadCompletion], Never>, [ReadCompletion])

    let maxBytesPerCall: Int
    let logger: Logger
    let queue = ConditionLock(State())
    private let threads = ConditionLock<[SystemThread]>([])

    init(maxBytesPerCall: Int, logger: Logger) {
        self.maxBytesPerCall = maxBytesPerCall
        self.logger = logger
    }

    func start(threads count: Int) throws(Errno) {
        for number in 0..<count {
            do {
                let thread = try SystemThread(name: "kvtier-pread\(number)") { [self] in runWorker() }
                threads.withLock { $0.append(thread) }
            } catch {
                close()
                throw error
            }
        }
    }

    func start(_ batch: [ReadRequest], continuation: CheckedContinuation<[ReadCompletion], Never>) {
        let ready: Resumption? = queue.withLock { state in
            if state.closing {
                return (continuation, batch.map { ReadCompletion(tag: $0.tag, result: .failure(.readerClosed)) })
            }
            let id = state.nextBatch
            state.nextBatch &+= 1
            var entry = BatchState(requests: batch, continuation: continuation)
            for (index, request) in batch.enumerated() {
                if let error = ReadOperation.validate(request) {
                    _ = entry.finish(index: index, result: .failure(error))
                } else if request.length == 0 {
                    _ = entry.finish(index: index, result: .success(0))
                } else {
                    state.waiting.push(ReadOperation(request: request, batch: id, index: index))
                }
            }
            if entry.remaining == 0 {
                return (continuation, entry.completions)
            }
            state.batches[id] = entry
            return nil
        }
        if let (continuation, completions) = ready {
            continuation.resume(returning: completions)
        } else {
            queue.broadcast()
        }
    }

    private func runWorker() {
        while true {
            let next: ReadOperation? = queue.withLock(waitingUntil: { $0.closing || !$0.waiting.isEmpty }) { state in
                state.waiting.pop()
            }
            guard var operation = next else { return }  // closing and nothing left
            let result = perform(&operation)
            let ready: Resumption? = queue.withLock { state in
                guard var batch = state.batches[operation.batch] else { return nil }
                let outcome = state.closing ? .failure(.readerClosed) : result
                if batch.finish(index: operation.index, result: outcome) {
                    state.batches[operation.batch] = nil
                    return (batch.continuation, batch.completions)
                }
                state.batches[operation.batch] = batch
                return nil
            }
            if let (continuation, completions) = ready {
                continuation.resume(returning: completions)
            }
        }
    }

    /// Calls pread until the operation finishes.
    private func perform(_ operation: inout ReadOperation) -> Result<Int, ReadError> {
        while true {
            let count = pread(
                operation.request.descriptor.rawValue,
                operation.nextDestination,
                operation.nextLength(maxBytesPerCall: maxBytesPerCall),
                off_t(operation.nextOffset)
            )
            switch operation.record(count < 0 ? -Int(errno) : count) {
            case .again: continue
            case .finished(let result): return result
            }
        }
    }

    /// Fails reads that have not started, lets running ones finish (reporting them closed), and
    /// joins the threads.
    func close() {
        let ready: [Resumption] = queue.withLock { state in
            guard !state.closing else { return [] }
            state.closing = true
            var ready: [Resumption] = []
            for operation in state.waiting.removeAll() {
                guard var batch = state.batches[operation.batch] else { continue }
                if batch.finish(index: operation.index, result: .failure(.readerClosed)) {
                    state.batches[operation.batch] = nil
                    ready.append((batch.continuation, batch.completions))
                } else {
                    state.batches[operation.batch] = batch
                }
            }
            return ready
        }
        queue.broadcast()
        for (continuation, completions) in ready {
            continuation.resume(returning: completions)
        }
        let running = threads.withLock { threads in
            defer { threads.removeAll() }
            return threads
        }
        for thread in running {
            thread.join()
        }
    }
}
