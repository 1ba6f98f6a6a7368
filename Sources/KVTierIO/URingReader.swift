import CKVTierURingShim
import KVTierSystem
import Logging
import Synchronization
import SystemPackage

/// Reads through one io_uring ring.
///
/// Any task may submit: a batch's entries are prepared under a lock and handed to the kernel with
/// one `io_uring_submit`. A dedicated thread blocks in `io_uring_wait_cqe`, matches completions to
/// requests through their user data, resubmits the remainder of short reads, and resumes a batch's
/// caller once all of its requests are done. At most `queueDepth` reads are in flight; the rest
/// wait in a queue and are submitted as slots free up. No SQPOLL: a polling kernel thread costs a
/// core, and the daemon has two.
public final class URingReader: BlockReader {
    public let path: IOPath
    private let core: URingCore

    /// Creates the ring and its completion thread.
    /// - Parameter queueDepth: submission entries, clamped to `1...IOLimits.maxQueueDepth` and
    ///   rounded up to a power of two by the kernel. Default `IOLimits.defaultQueueDepth` (64).
    /// - Throws: why io_uring cannot be used here.
    public convenience init(
        queueDepth: Int = IOLimits.defaultQueueDepth,
        logger: Logger
    ) throws(URingUnavailableReason) {
        try self.init(queueDepth: queueDepth, logger: logger, maxBytesPerCall: IOLimits.maxBytesPerCall)
    }

    /// `maxBytesPerCall` below the default lets tests force the resubmission of remainders.
    init(queueDepth: Int, logger: Logger, maxBytesPerCall: Int) throws(URingUnavailableReason) {
        let entries = min(max(queueDepth, 1), IOLimits.maxQueueDepth)
        let ring: URing
        do {
            ring = try URing(entries: entries)
        } catch {
            throw .setupFailed(error)
        }
        guard ring.supportsRead else { throw .readOpcodeUnsupported }
        let ringEntries = ring.entries
        let core = URingCore(ring: ring, maxBytesPerCall: max(1, maxBytesPerCall), logger: logger)
        do {
            try core.startCompletionThread()
        } catch {
            throw .completionThreadFailed(error)
        }
        self.core = core
        self.path = .ioUring(queueDepth: ringEntries)
    }

    deinit { core.close() }

    public func read(_ batch: [ReadRequest]) async -> [ReadCompletion] {
        guard !batch.isEmpty else { return [] }
        return await withCheckedContinuation { continuation in
            core.start(batch, continuation: continuation)
        }
    }

    public func close() { core.close() }
}

/// The ring, its bookkeeping and its completion thread.
// Invariant for @unchecked Sendable: the ring's submission side is used only while `state` is
// locked, its completion side only by the completion thread, and every other mutable value lives
// in `state` or `thread`.
private final class URingCore: @unchecked Sendable {
    /// User data of the no-op that tells the completion thread to stop.
    static let stopUserData = UInt64.max
    /// User data of the cancellation submitted by `close`.
    static let cancelUserData = UInt64.max - 1

    struct State {
        /// Operations in flight, indexed by their user data.
        var slots: [ReadOperation?]
        var freeSlots: [Int]
        /// Operations waiting for a slot.
        var pending = FIFO<ReadOperation>()
        var batches: [UInt64: BatchState] = [:]
        var nextBatch: UInt64 = 0
        var closing = false
        var stopSeen = false
        /// Set when the ring failed; new reads fail with it.
        var failure: Errno?

        var inFlight: Int { slots.count - freeSlots.count }
    }

    typealias Resumption = (CheckedContinuation<[ReadCompletion], Never>, [ReadCompletion])

    let ring: URing
    let maxBytesPerCall: Int
    let logger: Logger
    let state: Mutex<State>
    let thread = Mutex<SystemThread?>(nil)

    init(ring: consuming URing, maxBytesPerCall: Int, logger: Logger) {
        let entries = ring.entries
        self.ring = ring
        self.maxBytesPerCall = maxBytesPerCall
        self.logger = logger
        self.state = Mutex(State(slots: Array(repeating: nil, count: entries), freeSlots: Array((0..<entries).reversed())))
    }

    func startCompletionThread() throws(Errno) {
        let started = try SystemThread(name: "kvtier-uring") { [self] in runCompletions() }
        thread.withLock { $0 = started }
    }

    // MARK: Submission (any task)

    func start(_ batch: [ReadRequest], continuation: CheckedContinuation<[ReadCompletion], Never>) {
        let ready: [Resumption] = state.withLock { state in
            if state.closing || state.failure != nil {
                let error: ReadError = state.failure.map { .system($0) } ?? .readerClosed
                return [(continuation, batch.map { ReadCompletion(tag: $0.tag, result: .failure(error)) })]
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
                    state.pending.push(ReadOperation(request: request, batch: id, index: index))
                }
            }
            if entry.remaining == 0 {
                return [(continuation, entry.completions)]
            }
            state.batches[id] = entry
            var ready: [Resumption] = []
            fillSlotsAndSubmit(&state, ready: &ready, submitNeeded: false)
            return ready
        }
        resume(ready)
    }

    /// Moves waiting operations into free slots and submits everything prepared. Called with the
    /// lock held.
    private func fillSlotsAndSubmit(_ state: inout State, ready: inout [Resumption], submitNeeded: Bool) {
        var submitNeeded = submitNeeded
        while !state.pending.isEmpty, let slot = state.freeSlots.popLast() {
            guard let operation = state.pending.pop() else {
                state.freeSlots.append(slot)
                break
            }
            state.slots[slot] = operation
            prepare(operation, slot: slot)
            submitNeeded = true
        }
        guard submitNeeded else { return }
        do throws(Errno) {
            try ring.submit()
        } catch {
            fail(&state, with: error, ready: &ready)
        }
    }

    /// Prepares the next kernel read of `operation` in `slot`. Called with the lock held; the
    /// queue has room because at most one entry per slot is prepared between submissions.
    private func prepare(_ operation: ReadOperation, slot: Int) {
        let prepared = ring.prepareRead(
            descriptor: operation.request.descriptor.rawValue,
            destination: operation.nextDestination,
            length: operation.nextLength(maxBytesPerCall: maxBytesPerCall),
            offset: operation.nextOffset,
            userData: UInt64(slot)
        )
        precondition(prepared, "io_uring submission queue full with one entry per slot")
    }

    /// The ring cannot submit: fail the waiting operations and every later read. Operations in
    /// flight still complete through the completion thread.
    private func fail(_ state: inout State, with errno: Errno, ready: inout [Resumption]) {
        if state.failure == nil {
            logger.error("io_uring submission failed; failing reads", metadata: ["errno": "\(errno.rawValue)", "error": "\(errno)"])
        }
        state.failure = errno
        for operation in state.pending.removeAll() {
            finish(operation, result: .failure(.system(errno)), state: &state, ready: &ready)
        }
    }

    private func finish(_ operation: ReadOperation, result: Result<Int, ReadError>, state: inout State, ready: inout [Resumption]) {
        guard var batch = state.batches[operation.batch] else { return }
        if batch.finish(index: operation.index, result: result) {
            state.batches[operation.batch] = nil
            ready.append((batch.continuation, batch.completions))
        } else {
            state.batches[operation.batch] = batch
        }
    }

    private func resume(_ ready: [Resumption]) {
        for (continuation, completions) in ready {
            continuation.resume(returning: completions)
        }
    }

    // MARK: Completion thread

    private func runCompletions() {
        var reaped: [kvt_uring_completion] = []
        reaped.reserveCapacity(ring.completionEntries)
        while true {
            do {
                try ring.waitForCompletion()
            } catch {
                abandon(after: error)
                return
            }
            reaped.removeAll(keepingCapacity: true)
            ring.reap(into: &reaped)
            let (ready, done) = state.withLock { state in
                var ready: [Resumption] = []
                let submitNeeded = process(reaped, state: &state, ready: &ready)
                if !state.closing && state.failure == nil {
                    fillSlotsAndSubmit(&state, ready: &ready, submitNeeded: submitNeeded)
                } else if submitNeeded {
                    do throws(Errno) { try ring.submit() } catch { fail(&state, with: error, ready: &ready) }
                }
                return (ready, state.stopSeen && state.inFlight == 0)
            }
            resume(ready)
            if done { return }
        }
    }

    /// Applies reaped completions; true when resubmissions were prepared. Called with the lock held.
    private func process(_ reaped: [kvt_uring_completion], state: inout State, ready: inout [Resumption]) -> Bool {
        var submitNeeded = false
        for completion in reaped {
            switch completion.user_data {
            case Self.stopUserData:
                state.stopSeen = true
                continue
            case Self.cancelUserData:
                continue
            default:
                break
            }
            let slot = Int(truncatingIfNeeded: completion.user_data)
            guard slot >= 0, slot < state.slots.count, var operation = state.slots[slot] else {
                logger.warning("io_uring completion for an unknown slot", metadata: ["userData": "\(completion.user_data)"])
                continue
            }
            let step: ReadOperation.Step = state.closing
                ? .finished(.failure(.readerClosed))
                : operation.record(Int(completion.res))
            switch step {
            case .again:
                state.slots[slot] = operation
                prepare(operation, slot: slot)
                submitNeeded = true
            case .finished(let result):
                state.slots[slot] = nil
                state.freeSlots.append(slot)
                finish(operation, result: result, state: &state, ready: &ready)
            }
        }
        return submitNeeded
    }

    /// `io_uring_wait_cqe` failed, which leaves the ring unusable: fail everything and stop.
    private func abandon(after errno: Errno) {
        logger.critical("io_uring wait failed; completion thread stopping", metadata: ["errno": "\(errno.rawValue)", "error": "\(errno)"])
        let ready: [Resumption] = state.withLock { state in
            var ready: [Resumption] = []
            state.failure = state.failure ?? errno
            for operation in state.pending.removeAll() {
                finish(operation, result: .failure(.system(errno)), state: &state, ready: &ready)
            }
            for slot in state.slots.indices {
                guard let operation = state.slots[slot] else { continue }
                state.slots[slot] = nil
                state.freeSlots.append(slot)
                finish(operation, result: .failure(.system(errno)), state: &state, ready: &ready)
            }
            return ready
        }
        resume(ready)
    }

    // MARK: Shutdown

    /// Fails waiting reads, cancels those in flight, and stops the completion thread once the
    /// kernel has returned every buffer.
    func close() {
        let (ready, stopQueued): ([Resumption], Bool) = state.withLock { state in
            guard !state.closing else { return ([], false) }
            state.closing = true
            var ready: [Resumption] = []
            for operation in state.pending.removeAll() {
                finish(operation, result: .failure(.readerClosed), state: &state, ready: &ready)
            }
            if state.inFlight > 0 {
                _ = ring.prepareCancelAll(userData: Self.cancelUserData)
            }
            guard ring.prepareNoOperation(userData: Self.stopUserData) else { return (ready, false) }
            do throws(Errno) {
                try ring.submit()
                return (ready, true)
            } catch {
                logger.error("io_uring stop could not be submitted; completion thread left running", metadata: ["errno": "\(error.rawValue)"])
                return (ready, false)
            }
        }
        resume(ready)
        guard stopQueued else { return }
        let running = thread.withLock { $0.take() }
        running?.join()
    }
}
