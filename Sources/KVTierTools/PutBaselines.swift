#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import KVTierCore

/// The same-run baselines of `kvtier bench put`: a memcpy of a put's bytes, and a plain append
/// of a durable put's encoded bytes followed by one fdatasync.
enum PutBaselines {
    /// Median seconds of `repetitions` single-core memcpys of `bytes` between two buffers touched
    /// beforehand (a put's destination, the page arena, is committed memory in steady state too).
    static func memcpySeconds(bytes: Int, repetitions: Int) throws -> Double {
        let source = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes, alignment: 4096)
        let destination = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes, alignment: 4096)
        defer { source.deallocate(); destination.deallocate() }
        source.initializeMemory(as: UInt8.self, repeating: 0x5A)
        destination.initializeMemory(as: UInt8.self, repeating: 0)
        guard let copy = OpaqueMemcpy.copy else { throw ToolError("cannot find memcpy with dlsym") }
        var seconds: [Double] = []
        for _ in 0..<max(1, repetitions) {
            let start = Clocks.monotonicNanoseconds()
            _ = copy(destination.baseAddress, source.baseAddress, bytes)
            seconds.append(Double(Clocks.monotonicNanoseconds() - start) / 1e9)
        }
        return percentile(seconds, 50)
    }

    /// A file that grows by plain `pwrite`s, each followed by one `fdatasync`: what a durable put
    /// of the same encoded bytes costs the disk at least (an append that also changes the size,
    /// as the disk tier's segment appends do).
    final class AppendFile {
        let path: String
        private let descriptor: Int32
        private var end: Int = 0
        private var buffer: UnsafeMutableRawBufferPointer

        init(path: String) throws {
            self.path = path
            descriptor = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            guard descriptor >= 0 else { throw ToolError("cannot create \(path): \(String(cString: strerror(errno)))") }
            buffer = .allocate(byteCount: 1 << 20, alignment: 4096)
            fill(buffer)
        }

        deinit {
            close(descriptor)
            buffer.deallocate()
            unlink(path)
        }

        /// Seconds one `pwrite` of `bytes` at the file's end and one `fdatasync` take.
        func appendAndSync(bytes: Int) throws -> Double {
            if buffer.count < bytes {
                buffer.deallocate()
                buffer = .allocate(byteCount: bytes, alignment: 4096)
                fill(buffer)
            }
            let start = Clocks.monotonicNanoseconds()
            var written = 0
            while written < bytes {
                let n = pwrite(descriptor, buffer.baseAddress! + written, bytes - written, off_t(end + written))
                if n < 0 {
                    if errno == EINTR { continue }
                    throw ToolError("pwrite to \(path): \(String(cString: strerror(errno)))")
                }
                written += n
            }
            while fdatasync(descriptor) != 0 {
                if errno != EINTR { throw ToolError("fdatasync of \(path): \(String(cString: strerror(errno)))") }
            }
            end += bytes
            return Double(Clocks.monotonicNanoseconds() - start) / 1e9
        }

        /// Bytes that do not compress to nothing, as encoded pages.
        private func fill(_ buffer: UnsafeMutableRawBufferPointer) {
            var random = SplitMix64(seed: 0xD15C)
            let words = buffer.bindMemory(to: UInt64.self)
            for i in words.indices { words[i] = random.next() }
        }
    }

    /// The `q`th percentile (0...100) by nearest rank; 0 for no values.
    static func percentile(_ values: [Double], _ q: Double) -> Double {
        guard !values.isEmpty else { return 0 }
        let sorted = values.sorted()
        let rank = Int((q / 100 * Double(sorted.count)).rounded(.up))
        return sorted[min(max(rank, 1), sorted.count) - 1]
    }

    /// The 1-, 5- and 15-minute load averages (`/proc/loadavg`), or nil where there is none.
    static func loadAverage() -> String? {
        guard let file = fopen("/proc/loadavg", "r") else { return nil }
        defer { fclose(file) }
        var line = [CChar](repeating: 0, count: 128)
        guard fgets(&line, Int32(line.count), file) != nil else { return nil }
        let text = String(decoding: line.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return text.split(separator: " ").prefix(3).joined(separator: " ")
    }
}
