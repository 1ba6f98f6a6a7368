@preconcurrency import Glibc
import KVTierProtocol
import KVTierSystem
import SystemPackage

/// One accepted client socket (non-blocking), driven by its own thread: reads frames through a
/// `FrameDecoder` while timing each frame against `frameTimeout`, and writes replies whole. The
/// socket is owned and closed by `KVServer`, which may also shut it down to wake this thread.
final class Connection {
    /// What reading the socket produced.
    enum Event {
        case frame(Frame)
        /// The bytes break the protocol; `header` is the offending frame's header (always read,
        /// since the decoder checks headers only).
        case protocolError(ProtocolError, header: FrameHeader?)
        /// A frame did not complete within `frameTimeout`; `header` when its 16 bytes came.
        /// `admitted` is false when it was still waiting for room in the `FrameBudget`.
        case timedOut(header: FrameHeader?, admitted: Bool)
        /// No `HELLO` within `handshakeTimeout` (`beforeHello`), or no frame within
        /// `idleTimeout` after the last reply.
        case idle(beforeHello: Bool)
        /// End of stream; `receivedBytes` of an unfinished frame were lost with it.
        case peerClosed(header: FrameHeader?, receivedBytes: Int)
        /// The server is shutting down (its wake pipe became readable).
        case stopping
        case failed(Errno)
    }

    let descriptor: FileDescriptor
    private let wakeDescriptor: FileDescriptor
    private let frameTimeout: Duration
    private let handshakeTimeout: Duration
    private let idleTimeout: Duration
    private let connectedAt = ContinuousClock.now
    /// Set by the server once it answered `HELLO`: from then on `idleTimeout` applies.
    var helloAnswered = false
    private let budget: FrameBudget
    private let uid: UInt32
    /// Bytes of `budget` this connection holds for the frame being assembled (or just answered).
    private var reservedBytes = 0
    /// Whether this connection counts in `budget.waitingFrames`.
    private var waitingForBudget = false {
        didSet {
            if waitingForBudget != oldValue { budget.waitingFrames.wrappingAdd(waitingForBudget ? 1 : -1, ordering: .relaxed) }
        }
    }
    /// How long a frame waiting for room in the budget sleeps between checks.
    static let budgetRecheck: Duration = .milliseconds(20)
    private var decoder: FrameDecoder
    private let receiveBuffer: UnsafeMutableRawBufferPointer
    /// When the frame being assembled began; nil between frames, so idling is never timed.
    private var frameStartedAt: ContinuousClock.Instant?
    /// Totals that locate the unfinished frame: its header was read once 16 of its bytes came.
    private var bytesAppended = 0
    private var bytesDelivered = 0

    init(descriptor: FileDescriptor, wakeDescriptor: FileDescriptor, configuration: ServerConfiguration, budget: FrameBudget, uid: UInt32) {
        self.descriptor = descriptor
        self.wakeDescriptor = wakeDescriptor
        self.frameTimeout = configuration.frameTimeout
        self.handshakeTimeout = configuration.handshakeTimeout
        self.idleTimeout = configuration.idleTimeout
        self.budget = budget
        self.uid = uid
        self.decoder = FrameDecoder(maxControlBody: configuration.maxControlBody, maxInlineBody: configuration.maxInlineBody)
        self.receiveBuffer = .allocate(byteCount: max(configuration.receiveBufferBytes, ProtocolLimits.frameHeaderBytes), alignment: 16)
    }

    deinit {
        receiveBuffer.deallocate()
        budget.release(reservedBytes, uid: uid)
        waitingForBudget = false
    }

    private var unfinishedFrameBytes: Int { bytesAppended - bytesDelivered }
    private var unfinishedHeader: FrameHeader? {
        unfinishedFrameBytes >= ProtocolLimits.frameHeaderBytes ? decoder.currentHeader : nil
    }

    /// Blocks until a whole frame, an error, the end of the stream, a frame, handshake or idle
    /// timeout, or shutdown. A frame's clock starts with its first byte, or, for bytes that
    /// arrived while the previous request was being handled, when the server turns back to
    /// reading; so does the idle clock. A frame larger than the receive buffer is read only
    /// once the `FrameBudget` holds room for all of it.
    func nextEvent() -> Event {
        // Whatever ends the wait, this connection no longer waits for room.
        defer { waitingForBudget = false }
        // The previous frame was answered: its bytes are gone.
        budget.release(reservedBytes, uid: uid)
        reservedBytes = 0
        let idleSince = ContinuousClock.now
        while true {
            do {
                if let frame = try decoder.nextFrame() {
                    bytesDelivered += ProtocolLimits.frameHeaderBytes + frame.body.count
                    frameStartedAt = nil
                    return .frame(frame)
                }
            } catch {
                return .protocolError(error, header: decoder.currentHeader)
            }
            let now = ContinuousClock.now
            frameStartedAt = decoder.isMidFrame ? (frameStartedAt ?? now) : nil
            var deadline: ContinuousClock.Instant?
            if let start = frameStartedAt {
                deadline = start + frameTimeout
                if now >= start + frameTimeout { return .timedOut(header: unfinishedHeader, admitted: admitted) }
            }
            // Before HELLO the handshake clock runs even mid-frame (a client trickling bytes
            // must not hold a slot); after it only idling between frames is timed.
            let idleDeadline: ContinuousClock.Instant? = !helloAnswered ? connectedAt + handshakeTimeout
                : frameStartedAt == nil ? idleSince + idleTimeout : nil
            if let idleDeadline {
                if now >= idleDeadline { return .idle(beforeHello: !helloAnswered) }
                deadline = min(deadline ?? idleDeadline, idleDeadline)
            }
            var readLimit = receiveBuffer.count
            if let missing = decoder.missingFrameBytes, let header = unfinishedHeader {
                let frameBytes = ProtocolLimits.frameHeaderBytes + Int(header.bodyBytes)
                if frameBytes > receiveBuffer.count {
                    if reservedBytes < frameBytes {
                        waitingForBudget = !budget.tryReserve(frameBytes - reservedBytes, uid: uid)
                        guard !waitingForBudget else {
                            // No room: leave the socket unread (the sender blocks) and look again
                            // shortly; the frame clock keeps running.
                            let pause = min(deadline.map { $0 - now } ?? Self.budgetRecheck, Self.budgetRecheck)
                            do {
                                if try Poll.waitReadable(wakeDescriptor, timeoutMillis: Poll.millisecondsRoundedUp(pause)) { return .stopping }
                            } catch {
                                return .failed(error)
                            }
                            continue
                        }
                        reservedBytes = frameBytes
                        decoder.reserveForCurrentFrame()
                    }
                    // Read no further than this frame, so the buffer ends where it ends.
                    readLimit = min(readLimit, max(missing, 1))
                }
            }
            let timeoutMillis = deadline.map { Poll.millisecondsRoundedUp($0 - now) } ?? -1
            var fds = [pollfd(descriptor, events: Int16(POLLIN)), pollfd(wakeDescriptor, events: Int16(POLLIN))]
            do { _ = try Poll.wait(&fds, timeoutMillis: timeoutMillis) } catch { return .failed(error) }
            if fds[1].revents != 0 { return .stopping }
            guard fds[0].revents != 0 else { continue }
            let count: Int
            do {
                count = try descriptor.receive(into: UnsafeMutableRawBufferPointer(rebasing: receiveBuffer[..<readLimit]), wait: false)
            } catch where error == .resourceTemporarilyUnavailable {
                continue
            } catch {
                return .failed(error)
            }
            guard count > 0 else { return .peerClosed(header: unfinishedHeader, receivedBytes: unfinishedFrameBytes) }
            decoder.append(UnsafeRawBufferPointer(rebasing: receiveBuffer[..<count]))
            bytesAppended += count
        }
    }

    /// Whether the frame being assembled is not waiting for room in the budget.
    private var admitted: Bool {
        guard let header = unfinishedHeader else { return true }
        let frameBytes = ProtocolLimits.frameHeaderBytes + Int(header.bodyBytes)
        return frameBytes <= receiveBuffer.count || reservedBytes >= frameBytes
    }

    /// Writes `bytes` whole, `descriptors` riding on the first byte, within `frameTimeout`
    /// (a peer that stops reading cannot hold the thread longer). Throws `timedOut` at the
    /// deadline, or the send error (EPIPE, ECONNRESET once the peer is gone).
    func send(_ bytes: [UInt8], descriptors: [Int32] = []) throws(Errno) {
        let deadline = ContinuousClock.now + frameTimeout
        var offset = 0
        var pendingDescriptors = descriptors.map(FileDescriptor.init(rawValue:))
        while offset < bytes.count {
            let attempt = bytes.withUnsafeBytes { raw in
                Result { () throws(Errno) -> Int in
                    try descriptor.sendMessage(UnsafeRawBufferPointer(rebasing: raw[offset...]), descriptors: pendingDescriptors, wait: false)
                }
            }
            switch attempt {
            case .success(let sent):
                offset += sent
                pendingDescriptors = []
            case .failure(let error) where error == .resourceTemporarilyUnavailable:
                let remaining = deadline - ContinuousClock.now
                guard remaining > .zero else { throw .timedOut }
                var fds = [pollfd(descriptor, events: Int16(POLLOUT))]
                _ = try Poll.wait(&fds, timeoutMillis: Poll.millisecondsRoundedUp(remaining))
            case .failure(let error):
                throw error
            }
        }
    }
}
