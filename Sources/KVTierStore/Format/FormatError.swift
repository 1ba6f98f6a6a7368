/// Why bytes read from disk are not a valid structure of docs/format.md.
public enum FormatError: Error, Equatable, CustomStringConvertible {
    case badMagic(String)
    case unsupportedVersion(String, UInt32)
    case checksumMismatch(String, stored: UInt32, computed: UInt32)
    case inconsistent(String)
    case truncated(String)
    /// A version 2 record header whose tag does not check: not written by the daemon into this segment.
    case unauthenticated(String)

    public var description: String {
        switch self {
        case .badMagic(let what): "\(what) has the wrong magic number: not a KVTier file, or damaged"
        case .unsupportedVersion(let what, let v): "\(what) has format version \(v), which this KVTier does not read; upgrade KVTier"
        case .checksumMismatch(let what, let stored, let computed):
            "\(what) is damaged: checksum 0x\(String(stored, radix: 16)) stored, 0x\(String(computed, radix: 16)) computed"
        case .inconsistent(let why): "inconsistent structure: \(why)"
        case .truncated(let what): "\(what) ends early"
        case .unauthenticated(let what): "\(what) is not a record this segment's writer made (its tag does not check)"
        }
    }
}

/// Block size of segment files: every record, index block and header starts on one.
public enum Block {
    public static let size = 4096

    /// `n` rounded up to a whole number of blocks.
    public static func roundUp(_ n: Int) -> Int { (n + size - 1) / size * size }
}
