import CoreMetrics
import KVTierProtocol
import KVTierServer

/// Times every request of the handler it wraps into `kvtier_request_duration_seconds{opcode}`,
/// from the plan to the reply whether it was given at once or after pending work; errors are
/// timed too (a slow error is still a slow request).
public struct TimedRequestHandler: RequestHandler {
    let inner: any RequestHandler
    let metrics: DaemonMetrics

    public init(_ inner: any RequestHandler, metrics: DaemonMetrics) {
        self.inner = inner
        self.metrics = metrics
    }

    public func handle(_ request: Request, context: ConnectionContext) -> Handling {
        let start = ContinuousClock.now
        switch inner.handle(request, context: context) {
        case .reply(let reply):
            record(request, since: start)
            return .reply(reply)
        case .pending(let rest):
            return .pending { [self] in
                let reply = await rest()
                record(request, since: start)
                return reply
            }
        }
    }

    private func record(_ request: Request, since start: ContinuousClock.Instant) {
        let timer = metrics.timer(opcode: request.opcode.rawValue, name: "\(request.opcode)")
        let elapsed = (ContinuousClock.now - start).components
        timer.recordNanoseconds(elapsed.seconds &* 1_000_000_000 &+ elapsed.attoseconds / 1_000_000_000)
    }

    public func connectionClosed(_ context: ConnectionContext) async {
        await inner.connectionClosed(context)
    }
}
