import Logging
import Synchronization

/// The daemon-wide log level, changeable while running (SIGHUP reloads `logLevel`). Loggers made
/// through `makeHandler` read it on every message, so a change reaches every existing logger.
public final class LogLevelSwitch: Sendable {
    private let rawLevel: Atomic<UInt8>

    public init(_ level: Logger.Level) {
        rawLevel = Atomic(Self.index(of: level))
    }

    public var level: Logger.Level {
        get { Logger.Level.allCases[Int(rawLevel.load(ordering: .relaxed))] }
        set { rawLevel.store(Self.index(of: newValue), ordering: .relaxed) }
    }

    private static func index(of level: Logger.Level) -> UInt8 {
        UInt8(Logger.Level.allCases.firstIndex(of: level)!)
    }

    /// A handler writing to `base` at this switch's level (or the logger's own level once code
    /// sets one on it).
    public func makeHandler(_ base: any LogHandler) -> any LogHandler {
        SwitchedLogHandler(base: base, levelSwitch: self)
    }
}

/// A log handler whose level follows a `LogLevelSwitch` unless set on the logger itself.
struct SwitchedLogHandler: LogHandler {
    var base: any LogHandler
    let levelSwitch: LogLevelSwitch
    var ownLevel: Logger.Level?

    init(base: any LogHandler, levelSwitch: LogLevelSwitch) {
        self.base = base
        self.levelSwitch = levelSwitch
    }

    var logLevel: Logger.Level {
        get { ownLevel ?? levelSwitch.level }
        set { ownLevel = newValue }
    }

    var metadata: Logger.Metadata {
        get { base.metadata }
        set { base.metadata = newValue }
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { base[metadataKey: key] }
        set { base[metadataKey: key] = newValue }
    }

    func log(event: LogEvent) {
        var base = base
        base.logLevel = .trace  // This handler already filtered by level.
        base.log(event: event)
    }
}
