/// The 128-bit identity of a page: a hash chain over the model and the tokens of the page and all
/// pages before it, so equal prefixes give equal keys in every process.
public struct PageKey: Hashable, Sendable, Comparable, CustomStringConvertible {
    public var high: UInt64
    public var low: UInt64

    public init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }

    /// 32 lowercase hex digits, high half first.
    public var description: String { Self.hex(high) + Self.hex(low) }

    public init?(hex text: String) {
        guard text.utf8.count == 32,
              let high = UInt64(text.prefix(16), radix: 16),
              let low = UInt64(text.suffix(16), radix: 16)
        else { return nil }
        self.init(high: high, low: low)
    }

    public static func < (a: PageKey, b: PageKey) -> Bool { (a.high, a.low) < (b.high, b.low) }

    public static func hex(_ value: UInt64) -> String {
        let digits = String(value, radix: 16)
        return String(repeating: "0", count: 16 - digits.count) + digits
    }
}

/// Who owns a page or session: a uid, or a group a configured mapping gives several uids.
public struct TenantID: Hashable, Sendable, Comparable, CustomStringConvertible {
    public var rawValue: UInt32
    public init(_ rawValue: UInt32) { self.rawValue = rawValue }
    public static func < (a: TenantID, b: TenantID) -> Bool { a.rawValue < b.rawValue }
    public var description: String { rawValue & Self.groupBit != 0 ? "group:\(rawValue & ~Self.groupBit)" : String(rawValue) }

    /// Tenants at or above this id are Unix groups whose members share a tenant; below it, uids.
    public static let groupBit: UInt32 = 1 << 31

    /// The tenant shared by the members of group `gid`.
    public static func group(_ gid: UInt32) -> TenantID { TenantID(groupBit | gid) }
}

/// A page as the store addresses it: tenants never share an address.
public struct PageAddress: Hashable, Sendable, CustomStringConvertible {
    public var tenant: TenantID
    public var key: PageKey
    public init(tenant: TenantID, key: PageKey) {
        self.tenant = tenant
        self.key = key
    }
    public var description: String { "\(tenant)/\(key)" }
}
