import CoreMetrics
import KVTierProtocol
import KVTierServer

/// Times every request of the handler it wraps into `kvtier_request_duration_seconds{opcode}`;
/// errors are timed too (a slow error is still a slow request).
public struct TimedRequestHandler: RequestHandler {
    let inner: any RequestHandler
    let metrics: DaemonMetrics

    public init(_ inner: any RequestHandler, metrics: DaemonMetrics) {
        self.inner = inner
        self.metrics = metrics
    }

    public func handle(_ request: Request, context: ConnectionContext) async -> Reply {
        let timer = metrics.timer(opcode: request.opcode.rawValue, name: "\(request.opcode)")
        let start = ContinuousClock.now
        let reply = await inner.handle(request, context: context)
        let elapsed = (ContinuousClock.now - start).components
        timer.recordNanoseconds(elapsed.seconds &* 1_000_000_000 &+ elapsed.attoseconds / 1_000_000_000)
        return reply
    }

    public func connectionClosed(_ context: ConnectionContext) async {
        await inner.connectionClosed(context)
    }
}
