@preconcurrency import Glibc
import ArgumentParser
import KVTierCodec
import KVTierCore
import KVTierIO
import KVTierStore
import KVTierTools
import Logging
import Synchronization

/// Hidden commands for tests and fault hunting; not part of the supported CLI.
struct DebugCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "debug",
        abstract: "Tools for crash and fault testing (unsupported, may change).",
        shouldDisplay: false,
        subcommands: [CrashWriter.self]
    )

    /// Writes pages into a disk tier until killed, logging every acknowledged put and delete, so a
    /// test can SIGKILL it at any moment and check the store against the log
    /// (Tests/KVTierDiskTests/ProcessCrashTests.swift).
    struct CrashWriter: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "crash-writer",
            abstract: "Write deterministic pages into a disk tier forever, logging acknowledgements.",
            discussion: """
                Each acknowledged write appends 'put N' and each acknowledged delete 'del N' to the \
                ack file with one write(2), strictly after the disk tier returned: a line in the file \
                means the store promised durability. 'deleting N' is appended before a delete starts \
                (after it, page N may be gone even without a 'del N'). Page N's shape and bytes follow from N alone \
                (CrashTestPage), so a checker needs nothing but the ack file.
                """
        )

        @Option(help: "State directory (the store goes in DIR/store).") var dir: String
        @Option(help: "Seed of the delete schedule and victim choice.") var seed: UInt64
        @Option(help: "Codec; must be lossless so contents can be checked bit-exactly.") var codec = "fp16+zstd"
        @Option(name: .customLong("ack-file"), help: "Append 'put N' / 'del N' here after each acknowledgement.")
        var ackFile: String?
        @Option(help: "Writers in flight at once (so groups hold many records).") var concurrency = 4
        @Option(name: .customLong("segment-bytes"), help: "Segment size limit (small, so segments rotate often).")
        var segmentBytes = 1 << 20
        @Option(name: .customLong("max-live"), help: "Above this many live pages every operation is a delete.")
        var maxLive = 128
        @Option(name: .customLong("first-page"), help: "First page number (default: one past every number in the store and the ack file).")
        var firstPage: UInt64?
        @Option(help: "Stop after this many puts and close cleanly (default: run until killed).")
        var puts: Int?

        func validate() throws {
            let parsed: Codec
            do { parsed = try Codec(name: codec) } catch { throw ValidationError("\(error)") }
            guard parsed.isLossless else { throw ValidationError("--codec must be lossless (fp16, fp16+lz4, fp16+zstd), got '\(codec)'") }
            guard concurrency >= 1 else { throw ValidationError("--concurrency must be at least 1") }
            guard segmentBytes >= 2 * Block.size else { throw ValidationError("--segment-bytes must be at least \(2 * Block.size)") }
        }

        func run() async throws {
            var logger = Logger(label: "kvtier.debug.crash-writer")
            logger.logLevel = .warning
            let codec = try Codec(name: self.codec)
            let selection: BlockReaderSelection
            do { selection = try BlockReaders.make(logger: logger) } catch {
                throw ValidationError("cannot start a block reader: \(error)")
            }
            let storage = PosixStorage(root: dir, reader: selection.reader, logger: logger)
            var configuration = DiskTierConfiguration()
            configuration.segmentBytes = segmentBytes
            configuration.retryAfterFailureMicros = 10_000
            let tier = try DiskTier(storage: storage, configuration: configuration, logger: logger)
            let ack = try AckLog(path: ackFile)

            let recovered = tier.pages().compactMap { CrashTestPage(address: $0.address)?.number }
            let start = firstPage ?? (max(recovered.max() ?? 0, ack.highestNumber ?? 0) + 1)
            standardError("crash-writer: \(tier.recovery); \(recovered.count) crash pages live; seed \(seed); first page \(start); reads via \(tier.readPath)")

            let shared = SharedState(WriterState(nextNumber: start, live: Set(recovered), putsLeft: puts ?? Int.max))
            let (seed, concurrency, maxLive) = (self.seed, self.concurrency, self.maxLive)
            await withTaskGroup(of: Void.self) { group in
                for worker in 0..<concurrency {
                    group.addTask {
                        var random = SplitMix64(seed: seed &+ UInt64(worker) &* 0x1_0000_0001)
                        await Self.work(tier, codec: codec, ack: ack, shared: shared, maxLive: maxLive, random: &random)
                    }
                }
            }
            await tier.close()
            selection.reader.close()
        }

        struct WriterState {
            var nextNumber: UInt64
            /// Pages this writer may delete: acknowledged (or recovered) and not being deleted.
            var live: Set<UInt64>
            var putsLeft: Int
        }

        final class SharedState: Sendable {
            let state: Mutex<WriterState>
            init(_ initial: WriterState) { state = Mutex(initial) }
        }

        enum Step {
            case put(UInt64)
            case delete(UInt64)
            case stop
        }

        static func work(
            _ tier: DiskTier, codec: Codec, ack: AckLog, shared: SharedState, maxLive: Int,
            random: inout SplitMix64
        ) async {
            var failures = 0
            while true {
                let roll = random.next()
                let step = shared.state.withLock { s -> Step in
                    if (s.live.count > maxLive || roll % 8 == 0), !s.live.isEmpty {
                        let victim = s.live[s.live.index(s.live.startIndex, offsetBy: Int((roll >> 8) % UInt64(s.live.count)))]
                        s.live.remove(victim)
                        return .delete(victim)
                    }
                    guard s.putsLeft > 0 else { return .stop }
                    s.putsLeft -= 1
                    defer { s.nextNumber += 1 }
                    return .put(s.nextNumber)
                }
                do throws(DiskTierError) {
                    switch step {
                    case .stop:
                        return
                    case .put(let number):
                        let page = CrashTestPage(number: number)
                        try await tier.write(page.address, modelID: CrashTestPage.modelID, codec: codec, shape: page.shape, data: page.data)
                        ack.append("put \(number)\n")
                        shared.state.withLock { _ = $0.live.insert(number) }
                    case .delete(let number):
                        // Logged before the delete starts: a tombstone can be durable before its
                        // acknowledgement, and a checker must then accept the page as gone.
                        ack.append("deleting \(number)\n")
                        if try await tier.delete(CrashTestPage(number: number).address) {
                            ack.append("del \(number)\n")
                        } else {
                            standardError("crash-writer: page \(number) was live but delete found nothing")
                        }
                    }
                    failures = 0
                } catch {
                    // Not acknowledged, so nothing is logged; a deletion that failed leaves the page live.
                    if case .delete(let number) = step { shared.state.withLock { _ = $0.live.insert(number) } }
                    standardError("crash-writer: \(error)")
                    failures += 1
                    if failures > 100 {
                        standardError("crash-writer: 100 failures in a row; giving up")
                        Glibc.exit(3)
                    }
                    try? await Task.sleep(for: .milliseconds(10))
                }
            }
        }
    }
}

/// The acknowledgement log: one `write(2)` per line on an O_APPEND descriptor, no user-space
/// buffer, so a line written before a SIGKILL is in the file afterwards.
final class AckLog: Sendable {
    let descriptor: Int32?
    /// The largest page number the log already names (so a restarted writer uses fresh numbers).
    let highestNumber: UInt64?

    init(path: String?) throws {
        guard let path else {
            descriptor = nil
            highestNumber = nil
            return
        }
        highestNumber = Self.highestNumber(in: path)
        let fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw ValidationError("cannot open --ack-file '\(path)': errno \(errno)") }
        descriptor = fd
    }

    deinit { if let descriptor { close(descriptor) } }

    func append(_ line: String) {
        guard let descriptor else { return }
        var bytes = Array(line.utf8)
        let written = bytes.withUnsafeMutableBytes { raw -> Int in
            while true {
                let n = write(descriptor, raw.baseAddress, raw.count)
                if n < 0 && errno == EINTR { continue }
                return n
            }
        }
        // A short or failed append would make the log claim less than the store holds, which a
        // checker cannot tell from data loss: stop instead.
        if written != bytes.count {
            standardError("crash-writer: ack file append failed (wrote \(written) of \(bytes.count) bytes, errno \(errno))")
            Glibc.exit(4)
        }
    }

    private static func highestNumber(in path: String) -> UInt64? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var contents: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            contents += chunk[0..<n]
        }
        var highest: UInt64?
        for line in contents.split(separator: UInt8(ascii: "\n")) {
            let fields = line.split(separator: UInt8(ascii: " "))
            guard fields.count == 2, let n = UInt64(String(decoding: fields[1], as: UTF8.self)) else { continue }
            highest = max(highest ?? 0, n)
        }
        return highest
    }
}

private func standardError(_ line: String) {
    let text = Array((line + "\n").utf8)
    _ = text.withUnsafeBytes { write(STDERR_FILENO, $0.baseAddress, $0.count) }
}
