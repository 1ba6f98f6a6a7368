import CoreMetrics
import KVTierProtocol
import KVTierServer

/// Times every request of the handler it wraps into `kvtier_request_duration_seconds{opcode}`,
/// on the immediate path and the async one alike; errors are timed too (a slow error is still a
/// slow request). A request the inner handler declines to answer immediately is timed once, by
/// `handle`.
public struct TimedRequestHandler: RequestHandler {
    let inner: any RequestHandler
    let metrics: DaemonMetrics

    public init(_ inner: any RequestHandler, metrics: DaemonMetrics) {
        self.inner = inner
        self.metrics = metrics
    }

    public func handleImmediately(_ request: Request, context: ConnectionContext) -> Reply? {
        let start = ContinuousClock.now
        guard let reply = inner.handleImmediately(request, context: context) else { return nil }
        record(request, since: start)
        return reply
    }

    public func handle(_ request: Request, context: ConnectionContext) async -> Reply {
        let start = ContinuousClock.now
        let reply = await inner.handle(request, context: context)
        record(request, since: start)
        return reply
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
