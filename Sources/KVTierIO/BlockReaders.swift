@preconcurrency import Glibc
import Logging
import SystemPackage

/// Why io_uring is not used.
public enum URingUnavailableReason: Error, Hashable, Sendable, CustomStringConvertible {
    /// `KVTIER_IO_URING=off` is set.
    case disabledByEnvironment
    /// `io_uring_queue_init` failed.
    case setupFailed(Errno)
    /// The kernel has io_uring but not IORING_OP_READ (Linux before 5.6).
    case readOpcodeUnsupported
    /// The completion thread could not be started.
    case completionThreadFailed(Errno)

    public var description: String {
        switch self {
        case .disabledByEnvironment:
            return "io_uring disabled by KVTIER_IO_URING=off; unset it to use io_uring"
        case .setupFailed(let errno) where errno == .noFunction:
            return "io_uring_setup: ENOSYS, the kernel is built without io_uring"
        case .setupFailed(let errno) where errno == .notPermitted:
            return "io_uring_setup: EPERM, blocked by a seccomp profile or kernel.io_uring_disabled; allow io_uring_setup in the container profile or set the sysctl to 0"
        case .setupFailed(let errno) where errno == .noMemory:
            return "io_uring_setup: ENOMEM, out of memory or RLIMIT_MEMLOCK too low (kernels before 5.12); lower the queue depth or raise the limit"
        case .setupFailed(let errno):
            return "io_uring_setup failed: \(errno) (errno \(errno.rawValue))"
        case .readOpcodeUnsupported:
            return "io_uring lacks IORING_OP_READ (Linux before 5.6); upgrade the kernel"
        case .completionThreadFailed(let errno):
            return "io_uring completion thread could not start: \(errno) (errno \(errno.rawValue))"
        }
    }
}

/// The reader chosen by `BlockReaders.make`, and why io_uring was not chosen, if it was not.
public struct BlockReaderSelection: Sendable {
    public let reader: any BlockReader
    /// `nil` when `reader` uses io_uring.
    public let fallbackReason: URingUnavailableReason?
}

/// Chooses how the disk tier reads.
public enum BlockReaders {
    /// Environment variable that forces the pread fallback: `KVTIER_IO_URING=off` (case does not
    /// matter; any other value, or none, lets io_uring be probed). For hosts where io_uring
    /// misbehaves and for tests of the fallback.
    public static let environmentVariable = "KVTIER_IO_URING"

    /// Returns an io_uring reader, or a pread reader with the reason io_uring is unusable.
    ///
    /// Probes by creating the ring (ENOSYS, EPERM from seccomp or `kernel.io_uring_disabled`,
    /// ENOMEM) and asking the kernel for IORING_OP_READ. When falling back it logs the reason once,
    /// as metadata of a constant message.
    /// - Parameters:
    ///   - queueDepth: io_uring queue depth; default `IOLimits.defaultQueueDepth` (64).
    ///   - preadThreads: threads of the fallback; default `IOLimits.defaultPreadThreads` (4).
    /// - Throws: only when the fallback's threads cannot be started either.
    public static func make(
        queueDepth: Int = IOLimits.defaultQueueDepth,
        preadThreads: Int = IOLimits.defaultPreadThreads,
        logger: Logger
    ) throws(Errno) -> BlockReaderSelection {
        let setting = getenv(environmentVariable).map { String(cString: $0) }
        return try make(queueDepth: queueDepth, preadThreads: preadThreads, logger: logger, setting: setting)
    }

    /// The same with the environment variable's value passed in.
    static func make(
        queueDepth: Int,
        preadThreads: Int,
        logger: Logger,
        setting: String?
    ) throws(Errno) -> BlockReaderSelection {
        let reason: URingUnavailableReason
        if setting?.lowercased() == "off" {
            reason = .disabledByEnvironment
        } else {
            do {
                let reader = try URingReader(queueDepth: queueDepth, logger: logger)
                return BlockReaderSelection(reader: reader, fallbackReason: nil)
            } catch {
                reason = error
            }
        }
        logger.warning(
            "io_uring unavailable; reading with the pread thread pool",
            metadata: ["reason": "\(reason)", "threads": "\(preadThreads)"]
        )
        let reader = try PreadReader(threads: preadThreads, logger: logger)
        return BlockReaderSelection(reader: reader, fallbackReason: reason)
    }
}
