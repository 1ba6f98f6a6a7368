/// A non-negative number of bytes, parsed from and printed as `64MiB`, `8GiB`, `512KiB`, `1000`.
///
/// Binary suffixes (KiB, MiB, GiB, TiB) are powers of 1024, decimal ones (kB, MB, GB, TB) powers
/// of 1000; a bare number is bytes.
public struct ByteCount: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var bytes: Int

    public init(_ bytes: Int) {
        precondition(bytes >= 0, "ByteCount must not be negative")
        self.bytes = bytes
    }

    public static func kibibytes(_ n: Int) -> ByteCount { ByteCount(n << 10) }
    public static func mebibytes(_ n: Int) -> ByteCount { ByteCount(n << 20) }
    public static func gibibytes(_ n: Int) -> ByteCount { ByteCount(n << 30) }

    public static func < (a: ByteCount, b: ByteCount) -> Bool { a.bytes < b.bytes }

    private static let units: [(suffix: String, factor: Int)] = [
        ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10),
        ("TB", 1_000_000_000_000), ("GB", 1_000_000_000), ("MB", 1_000_000), ("kB", 1000), ("KB", 1000),
        ("B", 1),
    ]

    /// Parses `"64MiB"`, `"1.5GiB"`, `"4096"`; returns nil for anything else.
    public init?(parsing text: String) {
        let trimmed = text.trimmingSpaces()
        var number = Substring(trimmed)
        var factor = 1
        for unit in Self.units where trimmed.hasSuffix(unit.suffix) {
            number = trimmed.dropLast(unit.suffix.count)
            factor = unit.factor
            break
        }
        let digits = String(number).trimmingSpaces()
        if let whole = Int(digits), whole >= 0 {
            let (product, overflow) = whole.multipliedReportingOverflow(by: factor)
            if overflow { return nil }
            self.init(product)
        } else if let fraction = Double(digits), fraction >= 0, fraction.isFinite,
                  fraction * Double(factor) < Double(Int.max) {
            self.init(Int((fraction * Double(factor)).rounded()))
        } else {
            return nil
        }
    }

    /// The largest binary unit that keeps the number at least 1, with up to two decimals.
    public var description: String {
        for unit in Self.units where unit.suffix.hasSuffix("iB") && bytes >= unit.factor {
            let value = Double(bytes) / Double(unit.factor)
            if bytes % unit.factor == 0 { return "\(bytes / unit.factor)\(unit.suffix)" }
            return "\(formatDecimal(value, places: 2))\(unit.suffix)"
        }
        return "\(bytes)B"
    }
}

extension String {
    func trimmingSpaces() -> String {
        var s = Substring(self)
        while s.first?.isWhitespace == true { s.removeFirst() }
        while s.last?.isWhitespace == true { s.removeLast() }
        return String(s)
    }
}

/// Formats `value` with exactly `places` decimals without Foundation.
public func formatDecimal(_ value: Double, places: Int) -> String {
    guard value.isFinite else { return "\(value)" }
    var scale = 1.0
    for _ in 0..<places { scale *= 10 }
    let scaled = (abs(value) * scale).rounded()
    let whole = Int(scaled / scale)
    let frac = Int(scaled - Double(whole) * scale)
    let sign = value < 0 && scaled != 0 ? "-" : ""
    if places == 0 { return "\(sign)\(whole)" }
    var fracText = String(frac)
    while fracText.count < places { fracText = "0" + fracText }
    return "\(sign)\(whole).\(fracText)"
}
