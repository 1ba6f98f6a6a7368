import CoreMetrics
import KVTierStore

/// The disk tier's timings as Prometheus histograms and byte counters (through swift-metrics,
/// into `DaemonMetrics`' registry): `kvtier_disk_read_seconds` (one record's I/O),
/// `kvtier_codec_seconds{op="decode"|"encode"}` (one page), `kvtier_disk_commit_seconds` (one
/// write group, fdatasync included), `kvtier_disk_read_bytes_total`, `kvtier_disk_written_bytes_total`.
struct DiskMetricsObserver: DiskTierObserver {
    static let readName = "kvtier_disk_read_seconds"
    static let codecName = "kvtier_codec_seconds"
    static let commitName = "kvtier_disk_commit_seconds"
    /// A page record read or decoded takes tens of microseconds to milliseconds; a group commit
    /// (an fdatasync) up to tens of milliseconds.
    static let buckets: [Duration] = [
        .microseconds(10), .microseconds(25), .microseconds(50), .microseconds(100), .microseconds(250), .microseconds(500),
        .milliseconds(1), .microseconds(2500), .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50),
        .milliseconds(100), .milliseconds(250), .seconds(1),
    ]

    let read: CoreMetrics.Timer
    let decode: CoreMetrics.Timer
    let encode: CoreMetrics.Timer
    let commit: CoreMetrics.Timer
    let readBytes: CoreMetrics.Counter
    let writtenBytes: CoreMetrics.Counter

    init(factory: any MetricsFactory) {
        read = CoreMetrics.Timer(label: Self.readName, factory: factory)
        decode = CoreMetrics.Timer(label: Self.codecName, dimensions: [("op", "decode")], factory: factory)
        encode = CoreMetrics.Timer(label: Self.codecName, dimensions: [("op", "encode")], factory: factory)
        commit = CoreMetrics.Timer(label: Self.commitName, factory: factory)
        readBytes = CoreMetrics.Counter(label: "kvtier_disk_read_bytes_total", factory: factory)
        writtenBytes = CoreMetrics.Counter(label: "kvtier_disk_written_bytes_total", factory: factory)
    }

    func pageRead(nanoseconds: UInt64, bytes: Int) {
        read.recordNanoseconds(Int64(clamping: nanoseconds))
        readBytes.increment(by: Int64(bytes))
    }

    func pageDecoded(nanoseconds: UInt64, rawBytes: Int) {
        decode.recordNanoseconds(Int64(clamping: nanoseconds))
    }

    func pageEncoded(nanoseconds: UInt64, rawBytes: Int) {
        encode.recordNanoseconds(Int64(clamping: nanoseconds))
    }

    func groupCommitted(nanoseconds: UInt64, records: Int, bytes: Int) {
        commit.recordNanoseconds(Int64(clamping: nanoseconds))
        writtenBytes.increment(by: Int64(bytes))
    }
}
