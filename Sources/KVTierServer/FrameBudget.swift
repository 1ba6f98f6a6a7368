import Synchronization

/// The bytes of frames being assembled, over all connections and per uid: a connection reserves
/// a whole frame here (header plus announced body) before it reads a body larger than its
/// receive buffer, and gives the reservation back once the frame was answered or the
/// connection closed. A frame that does not fit waits unread (the socket is not read, so the
/// sender blocks), for at most the frame timeout; so memory held for frames stays within
/// `ServerConfiguration.maxBufferedFrameBytes` however many clients stall mid-frame, and one
/// uid cannot take more than `maxBufferedFrameBytesPerUID` of it.
public final class FrameBudget: Sendable {
    public let totalBytes: Int
    public let perUIDBytes: Int

    private struct State {
        var used = 0
        var byUID: [UInt32: Int] = [:]
    }
    private let state = Mutex(State())
    /// Frames waiting for room now (a gauge, for tests and metrics).
    let waitingFrames = Atomic<Int>(0)

    public init(totalBytes: Int, perUIDBytes: Int) {
        self.totalBytes = totalBytes
        self.perUIDBytes = perUIDBytes
    }

    /// Frames waiting for room now.
    public var framesWaiting: Int { waitingFrames.load(ordering: .relaxed) }

    /// Bytes reserved now, over all connections.
    public var usedBytes: Int { state.withLock { $0.used } }

    /// Reserves `bytes` for `uid` when both limits allow it.
    func tryReserve(_ bytes: Int, uid: UInt32) -> Bool {
        state.withLock { state in
            let mine = state.byUID[uid, default: 0]
            guard bytes <= totalBytes - state.used, bytes <= perUIDBytes - mine else { return false }
            state.used += bytes
            state.byUID[uid] = mine + bytes
            return true
        }
    }

    func release(_ bytes: Int, uid: UInt32) {
        guard bytes > 0 else { return }
        state.withLock { state in
            state.used -= bytes
            let left = state.byUID[uid, default: 0] - bytes
            state.byUID[uid] = left > 0 ? left : nil
        }
    }
}
