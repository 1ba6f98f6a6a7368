/// Where the disk tier reports how long its work takes; kvtierd turns the reports into metrics
/// (KVTierStore itself depends on no metrics library). Called on the thread doing the work, so
/// an observer must be quick and must not call back into the disk tier.
public protocol DiskTierObserver: Sendable {
    /// One page record read from storage: the I/O alone.
    func pageRead(nanoseconds: UInt64, bytes: Int)
    /// One page's checksum and decode into 16-bit KV of `rawBytes` bytes.
    func pageDecoded(nanoseconds: UInt64, rawBytes: Int)
    /// One page encoded (quantized, compressed, checksummed) from `rawBytes` bytes.
    func pageEncoded(nanoseconds: UInt64, rawBytes: Int)
    /// One write group appended and made durable (its fdatasync included).
    func groupCommitted(nanoseconds: UInt64, records: Int, bytes: Int)
}
