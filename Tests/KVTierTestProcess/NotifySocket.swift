@preconcurrency import Glibc
import Foundation
import KVTierSystem
import SystemPackage

/// A datagram socket standing in for systemd's NOTIFY_SOCKET: the daemon under test sends its
/// READY=1, STATUS, WATCHDOG=1 and STOPPING=1 here.
public final class NotifySocket: @unchecked Sendable {
    // Invariant: `descriptor` is open from init to deinit and only read from.
    public let path: String
    public let descriptor: Int32

    public init(path: String) throws(ProcessFailure) {
        self.path = path
        let socket: FileDescriptor
        do { socket = try FileDescriptor.unixSocket(.datagram) } catch { throw ProcessFailure("socket: \(error)") }
        do throws(Errno) {
            try socket.bind(to: UnixSocketAddress(path))
        } catch {
            socket.closeIgnoringErrors()
            throw ProcessFailure("bind \(path): \(error) (errno \(error.rawValue))")
        }
        descriptor = socket.rawValue
    }

    deinit {
        close(descriptor)
        unlink(path)
    }

    /// Collects messages until one satisfies `done` or `seconds` pass; every message received.
    public func receive(until done: (String) -> Bool, seconds: Double) -> [String] {
        var messages: [String] = []
        let deadline = Date().addingTimeInterval(seconds)
        var buffer = [UInt8](repeating: 0, count: 4096)
        while Date() < deadline {
            guard !EventWaits.poll([descriptor], until: deadline).isEmpty else { continue }
            let n = buffer.withUnsafeMutableBytes { recv(descriptor, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            guard n > 0 else { continue }
            let message = String(decoding: buffer[0..<n], as: UTF8.self)
            messages.append(message)
            if done(message) { break }
        }
        return messages
    }

    /// How a wait for a message ended.
    public enum Outcome: Sendable { case arrived, exited, deadline }

    /// Waits, on a thread of its own, until a datagram containing `text` arrives, process `pid`
    /// exits (its pidfd; a peek every 50 ms without one) or `seconds` pass.
    public func awaitMessage(containing text: String, from pid: pid_t, seconds: Double = EventWaits.stuckSeconds) async -> Outcome {
        let descriptor = self.descriptor
        let deadline = Date().addingTimeInterval(seconds)
        return await EventWaits.onThread { () -> Outcome in
            let pidfd = EventWaits.pidDescriptor(pid)
            defer { if pidfd >= 0 { close(pidfd) } }
            var buffer = [UInt8](repeating: 0, count: 4096)
            while Date() < deadline {
                let slice = pidfd >= 0 ? deadline : min(deadline, Date().addingTimeInterval(0.05))
                let ready = EventWaits.poll(pidfd >= 0 ? [descriptor, pidfd] : [descriptor], until: slice)
                if ready.contains(descriptor) {
                    let n = buffer.withUnsafeMutableBytes { recv(descriptor, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
                    if n > 0, String(decoding: buffer[0..<n], as: UTF8.self).contains(text) { return .arrived }
                    continue
                }
                if ready.contains(pidfd) { return .exited }
                if pidfd < 0, EventWaits.hasExited(pid) { return .exited }
            }
            return .deadline
        }
    }
}
