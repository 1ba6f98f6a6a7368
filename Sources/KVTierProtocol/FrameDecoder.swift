/// Cuts one connection's byte stream into frames. Append what each read returned, then call
/// `nextFrame()` until it returns nil.
///
/// A header is checked (flags, request status, body size against its limit) as soon as its 16
/// bytes are here, before any of its body is waited for; the decoder never reserves memory for
/// an announced size, so a peer can make it hold at most one frame within its limit plus one
/// read. After an error the decoder is spent: the connection must be answered and closed.
public struct FrameDecoder: Sendable {
    private var buffer: [UInt8] = []
    /// Bytes of `buffer` before this are consumed; compacted away once they are at least half.
    private var readOffset = 0
    /// The header of the frame being assembled, already validated.
    private var pending: FrameHeader?
    private var failure: ProtocolError?

    public let maxControlBody: Int
    public let maxInlineBody: Int

    public init(maxControlBody: Int = ProtocolLimits.maxControlBody, maxInlineBody: Int = ProtocolLimits.maxInlineBody) {
        self.maxControlBody = maxControlBody
        self.maxInlineBody = maxInlineBody
    }

    /// Bytes received and not yet returned as frames (a pending frame's header excluded).
    public var bufferedBytes: Int { buffer.count - readOffset }

    /// Whether part of a frame is here: the server times this against
    /// `ProtocolLimits.frameTimeout`.
    public var isMidFrame: Bool { failure == nil && (pending != nil || bufferedBytes > 0) }

    /// The header of the frame being assembled, or of the frame that was rejected (its flags cut
    /// to the known bits): what the error reply echoes (`requestID`, `opcode`).
    public private(set) var currentHeader: FrameHeader?

    public mutating func append(_ bytes: UnsafeRawBufferPointer) {
        guard failure == nil, !bytes.isEmpty else { return }
        compactIfWorthwhile()
        buffer.append(contentsOf: bytes)
    }

    public mutating func append(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { append($0) }
    }

    /// The next whole frame, nil until more bytes arrive; throws for a frame the protocol does
    /// not allow (and again on every later call).
    public mutating func nextFrame() throws(ProtocolError) -> Frame? {
        if let failure { throw failure }
        do {
            return try decodeNext()
        } catch {
            failure = error
            buffer = []
            readOffset = 0
            throw error
        }
    }

    private mutating func decodeNext() throws(ProtocolError) -> Frame? {
        let header: FrameHeader
        if let pending {
            header = pending
        } else {
            guard bufferedBytes >= ProtocolLimits.frameHeaderBytes else { return nil }
            let start = readOffset
            let (fields, rawFlags) = try withRawBytes(buffer) { (raw) throws(ProtocolError) in
                try FrameHeader.readFields(UnsafeRawBufferPointer(rebasing: raw[start..<start + ProtocolLimits.frameHeaderBytes]))
            }
            header = fields
            currentHeader = header
            try header.check(rawFlags: rawFlags)
            try header.validateBodySize(maxControlBody: maxControlBody, maxInlineBody: maxInlineBody)
            readOffset += ProtocolLimits.frameHeaderBytes
            pending = header
        }
        let bodyBytes = Int(header.bodyBytes)
        guard bufferedBytes >= bodyBytes else { return nil }
        let body: [UInt8]
        if readOffset == 0 && buffer.count == bodyBytes && bodyBytes > 0 {
            // The buffer is exactly this body (see `reserveForCurrentFrame`): hand it over
            // rather than copy it, so a large frame is never held twice.
            body = buffer
            buffer = []
        } else {
            body = Array(buffer[readOffset..<readOffset + bodyBytes])
            readOffset += bodyBytes
        }
        pending = nil
        if readOffset == buffer.count {
            buffer.removeAll(keepingCapacity: buffer.capacity <= 2 * maxControlBody)
            readOffset = 0
        }
        return Frame(header: header, body: body)
    }

    /// Bytes still missing from the frame being assembled, once its header was read (nil
    /// before that): a reader that stops there leaves the buffer holding exactly that frame.
    public var missingFrameBytes: Int? {
        guard let pending, failure == nil else { return nil }
        return max(Int(pending.bodyBytes) - bufferedBytes, 0)
    }

    /// Makes room for the whole body of the frame being assembled in one allocation, and moves
    /// what is already here of it to the buffer's start, so a large frame is neither assembled
    /// by repeated doubling (each step copies, and for a moment holds both copies) nor copied
    /// when it completes. Only for a frame whose size the caller has budgeted: on its own the
    /// decoder never reserves memory for an announced size.
    public mutating func reserveForCurrentFrame() {
        guard let pending, failure == nil else { return }
        if readOffset > 0 {
            buffer.removeSubrange(0..<readOffset)
            readOffset = 0
        }
        buffer.reserveCapacity(Int(pending.bodyBytes))
    }

    /// Drops consumed bytes once they are at least half the buffer, so each byte is moved at
    /// most a constant number of times however the stream is cut.
    private mutating func compactIfWorthwhile() {
        guard readOffset > 0, readOffset * 2 >= buffer.count else { return }
        buffer.removeSubrange(0..<readOffset)
        readOffset = 0
    }
}
