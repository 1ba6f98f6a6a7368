@preconcurrency import Glibc
import Foundation
import KVTierTestProcess

extension ChildProcess {
    /// Waits for the process to exit, event-driven (pidfd), at most `seconds`; its wait status,
    /// or nil when it still runs.
    func awaitExit(seconds: Double = EventWaits.stuckSeconds) async throws -> Int32? {
        if let status = poll() { return status }
        let pid = self.pid
        let deadline = Date().addingTimeInterval(seconds)
        let exited = await EventWaits.onThread { EventWaits.exit(of: pid, until: deadline) }
        return exited ? poll() : nil
    }
}

extension NotifySocket {
    /// Waits until a datagram containing `text` arrives, the child exits, or the deadline
    /// passes; true when it arrived. Throws when the child exits first (with its log).
    func awaitMessage(containing text: String, child: ChildProcess, seconds: Double = EventWaits.stuckSeconds) async throws -> Bool {
        switch await awaitMessage(containing: text, from: child.pid, seconds: seconds) {
        case .arrived: return true
        case .exited:
            throw TestFailure("process \(child.pid) exited (\(child.poll().map(exitCode).map(String.init) ?? "?")) before sending \(text):\n\(child.log)")
        case .deadline: return false
        }
    }
}
