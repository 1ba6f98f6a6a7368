import SystemPackage

/// Progress of one request through possibly several kernel calls; shared by both readers so that
/// short reads, EOF and retries mean the same everywhere.
struct ReadOperation {
    /// What happens after a kernel call returned.
    enum Step {
        /// Call the kernel again for the rest (`nextOffset`, `nextDestination`, `nextLength`).
        case again
        /// The request is done.
        case finished(Result<Int, ReadError>)
    }

    let request: ReadRequest
    /// The batch and position in it that this operation completes.
    let batch: UInt64
    let index: Int
    private(set) var bytesDone = 0
    private var transientRetries = 0

    init(request: ReadRequest, batch: UInt64, index: Int) {
        self.request = request
        self.batch = batch
        self.index = index
    }

    /// Checks a request before any kernel call; `nil` when it may be submitted.
    static func validate(_ request: ReadRequest) -> ReadError? {
        guard request.offset >= 0, request.length >= 0, request.length <= request.destination.count else {
            return .invalidRequest
        }
        if request.isDirect {
            let alignment = IOLimits.directIOAlignment
            let address = request.destination.baseAddress.map { Int(bitPattern: $0) } ?? 0
            guard request.offset % Int64(alignment) == 0, request.length % alignment == 0,
                  address % alignment == 0
            else { return .misaligned }
        }
        return nil
    }

    var nextOffset: Int64 { request.offset + Int64(bytesDone) }

    var nextDestination: UnsafeMutableRawPointer {
        // validate() guarantees a base address whenever length > 0, and only such requests reach
        // the kernel.
        request.destination.baseAddress.unsafelyUnwrapped + bytesDone
    }

    func nextLength(maxBytesPerCall: Int) -> Int {
        min(request.length - bytesDone, maxBytesPerCall)
    }

    /// Records the result of one kernel call: bytes read, or a negated errno.
    mutating func record(_ result: Int) -> Step {
        if result < 0 {
            let errno = Errno(rawValue: CInt(truncatingIfNeeded: -result))
            if errno == .interrupted {
                return .again
            }
            if errno == .resourceTemporarilyUnavailable, transientRetries < IOLimits.maxTransientRetries {
                transientRetries += 1
                return .again
            }
            return .finished(.failure(.system(errno)))
        }
        if result == 0 {
            return .finished(.success(bytesDone))  // end of file
        }
        bytesDone += result
        if bytesDone >= request.length {
            return .finished(.success(bytesDone))
        }
        // O_DIRECT only stops short at end of file, and the remainder would be unaligned anyway.
        if request.isDirect, bytesDone % IOLimits.directIOAlignment != 0 {
            return .finished(.success(bytesDone))
        }
        return .again
    }
}

/// A FIFO of values with amortised O(1) push and pop.
struct FIFO<Element> {
    private var storage: [Element] = []
    private var head = 0

    var isEmpty: Bool { head == storage.count }
    var count: Int { storage.count - head }

    mutating func push(_ element: Element) { storage.append(element) }

    mutating func pop() -> Element? {
        guard head < storage.count else { return nil }
        let element = storage[head]
        head += 1
        if head == storage.count {
            storage.removeAll(keepingCapacity: true)
            head = 0
        } else if head >= 1024, head * 2 >= storage.count {
            storage.removeFirst(head)
            head = 0
        }
        return element
    }

    mutating func removeAll() -> [Element] {
        let rest = Array(storage[head...])
        storage.removeAll()
        head = 0
        return rest
    }
}

/// Results of one batch as they arrive, and who waits for them.
struct BatchState {
    var completions: [ReadCompletion]
    var remaining: Int
    let continuation: CheckedContinuation<[ReadCompletion], Never>

    init(requests: [ReadRequest], continuation: CheckedContinuation<[ReadCompletion], Never>) {
        self.completions = requests.map { ReadCompletion(tag: $0.tag, result: .failure(.readerClosed)) }
        self.remaining = requests.count
        self.continuation = continuation
    }

    /// Records one result; true when the batch is complete.
    mutating func finish(index: Int, result: Result<Int, ReadError>) -> Bool {
        completions[index].result = result
        remaining -= 1
        return remaining == 0
    }
}
