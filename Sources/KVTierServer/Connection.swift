@preconcurrency import Glibc
import KVTierProtocol
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
        case timedOut(header: FrameHeader?)
        /// End of stream; `receivedBytes` of an unfinished frame were lost with it.
        case peerClosed(header: FrameHeader?, receivedBytes: Int)
        /// The server is shutting down (its wake pipe became readable).
        case stopping
        case failed(Errno)
    }

    let descriptor: Int32
    private let wakeDescriptor: Int32
    private let frameTimeout: Duration
    private var decoder: FrameDecoder
    private let receiveBuffer: UnsafeMutableRawBufferPointer
    /// When the frame being assembled began; nil between frames, so idling is never timed.
    private var frameStartedAt: ContinuousClock.Instant?
    /// Totals that locate the unfinished frame: its header was read once 16 of its bytes came.
    private var bytesAppended = 0
    private var bytesDelivered = 0

    init(descriptor: Int32, wakeDescriptor: Int32, configuration: ServerConfiguration) {
        self.descriptor = descriptor
        self.wakeDescriptor = wakeDescriptor
        self.frameTimeout = configuration.frameTimeout
        self.decoder = FrameDecoder(maxControlBody: configuration.maxControlBody, maxInlineBody: configuration.maxInlineBody)
        self.receiveBuffer = .allocate(byteCount: max(configuration.receiveBufferBytes, ProtocolLimits.frameHeaderBytes), alignment: 16)
    }

    deinit { receiveBuffer.deallocate() }

    private var unfinishedFrameBytes: Int { bytesAppended - bytesDelivered }
    private var unfinishedHeader: FrameHeader? {
        unfinishedFrameBytes >= ProtocolLimits.frameHeaderBytes ? decoder.currentHeader : nil
    }

    /// Blocks until a whole frame, an error, the end of the stream, a frame timeout or shutdown.
    /// A frame's clock starts with its first byte, or, for bytes that arrived while the previous
    /// request was being handled, when the server turns back to reading.
    func nextEvent() -> Event {
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
            var timeoutMillis: Int32 = -1
            if let start = frameStartedAt {
                let remaining = start + frameTimeout - now
                guard remaining > .zero else { return .timedOut(header: unfinishedHeader) }
                timeoutMillis = Self.millisecondsRoundedUp(remaining)
            }
            var fds = [
                pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0),
                pollfd(fd: wakeDescriptor, events: Int16(POLLIN), revents: 0),
            ]
            do { _ = try SocketSystem.poll(&fds, timeoutMillis: timeoutMillis) } catch { return .failed(error) }
            if fds[1].revents != 0 { return .stopping }
            guard fds[0].revents != 0 else { continue }
            let count: Int
            do {
                count = try SocketSystem.receive(descriptor, into: receiveBuffer)
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

    /// Writes `bytes` whole, `descriptors` riding on the first byte, within `frameTimeout`
    /// (a peer that stops reading cannot hold the thread longer). Throws `timedOut` at the
    /// deadline, or the send error (EPIPE, ECONNRESET once the peer is gone).
    func send(_ bytes: [UInt8], descriptors: [Int32] = []) throws(Errno) {
        let deadline = ContinuousClock.now + frameTimeout
        var offset = 0
        var pendingDescriptors = descriptors
        while offset < bytes.count {
            let attempt = bytes.withUnsafeBytes { raw in
                Result { () throws(Errno) -> Int in
                    try SocketSystem.send(descriptor, UnsafeRawBufferPointer(rebasing: raw[offset...]), descriptors: pendingDescriptors)
                }
            }
            switch attempt {
            case .success(let sent):
                offset += sent
                pendingDescriptors = []
            case .failure(let error) where error == .resourceTemporarilyUnavailable:
                let remaining = deadline - ContinuousClock.now
                guard remaining > .zero else { throw .timedOut }
                var fds = [pollfd(fd: descriptor, events: Int16(POLLOUT), revents: 0)]
                _ = try SocketSystem.poll(&fds, timeoutMillis: Self.millisecondsRoundedUp(remaining))
            case .failure(let error):
                throw error
            }
        }
    }

    static func millisecondsRoundedUp(_ duration: Duration) -> Int32 {
        let (seconds, attoseconds) = duration.components
        let millis = seconds * 1000 + (attoseconds + 999_999_999_999_999) / 1_000_000_000_000_000
        return Int32(clamping: max(millis, 0))
    }
}
