import KVTierCore

/// A message body: encodes itself after a frame header and decodes from exactly the bytes of
/// one body (trailing bytes are malformed).
public protocol WireBody: Sendable, Equatable {
    func encode(into writer: inout ByteWriter) throws(ProtocolError)
    init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError)
}

extension WireBody {
    /// The encoded body alone (tests, tools).
    public func encodedBody() throws(ProtocolError) -> [UInt8] {
        var writer = ByteWriter()
        try encode(into: &writer)
        return writer.bytes
    }

    public init(decoding body: [UInt8]) throws(ProtocolError) {
        self = try withRawBytes(body) { (raw) throws(ProtocolError) -> Self in try Self(decoding: raw) }
    }
}

/// The wire `extent`: a run of the tenant's arena, `u64 offset`, `u64 bytes`, `u32 tokens`.
/// Offset and length are multiples of `ProtocolLimits.extentAlignment`; whether the run lies
/// inside the arena is the daemon's check, since only it knows `arenaBytes`. Named apart from
/// KVTierStore's `Extent` (offset and length only) so the server can import both.
public struct WireExtent: Sendable, Hashable {
    public var offset: UInt64
    public var bytes: UInt64
    public var tokens: UInt32

    public init(offset: UInt64, bytes: UInt64, tokens: UInt32) {
        self.offset = offset
        self.bytes = bytes
        self.tokens = tokens
    }

    /// Bytes of one encoded extent.
    static let encodedBytes = 20

    /// Why this extent cannot be sent, or nil.
    var defect: String? {
        let alignment = ProtocolLimits.extentAlignment
        if offset % alignment != 0 || bytes % alignment != 0 {
            return "extent offset \(offset) and length \(bytes) must be multiples of \(alignment)"
        }
        if offset.addingReportingOverflow(bytes).overflow {
            return "extent offset \(offset) + length \(bytes) overflows 64 bits"
        }
        return nil
    }
}

/// Page bytes of a `PUT` request or a `GET` reply: extents of the shared arena, or the bytes
/// themselves inline (for clients that cannot map memory).
public enum PageData: Sendable, Equatable {
    case extents([WireExtent])
    case inline([UInt8])

    public var isInline: Bool {
        if case .inline = self { return true }
        return false
    }

    func encode(into writer: inout ByteWriter, field: String) throws(ProtocolError) {
        switch self {
        case .extents(let extents): try writer.wireExtents(extents, field: field)
        case .inline(let bytes):
            writer.u64(UInt64(bytes.count))
            writer.raw(bytes)
        }
    }

    static func decode(from reader: inout BodyReader, inline: Bool, field: String) throws(ProtocolError) -> PageData {
        inline ? .inline(try reader.inlineBytes(field)) : .extents(try reader.extents(field))
    }
}

/// The name the brief and the `PUT` section use for `PageData`.
public typealias PutData = PageData

extension ByteWriter {
    mutating func f32(_ value: Float) { u32(value.bitPattern) }
    mutating func bool(_ value: Bool) { u8(value ? 1 : 0) }

    /// `u16 length` then UTF-8; throws past `maxStringBytes`.
    mutating func wireString(_ string: String, field: String) throws(ProtocolError) {
        let count = string.utf8.count
        guard count <= ProtocolLimits.maxStringBytes else {
            throw .tooLarge(what: "string \(field) (UTF-8 bytes)", size: UInt64(count), limit: UInt64(ProtocolLimits.maxStringBytes))
        }
        u16(UInt16(count))
        raw(string.utf8)
    }

    /// `u32 count` then the token ids; throws past `maxTokensPerRequest`.
    mutating func wireTokens(_ tokens: [UInt32], field: String) throws(ProtocolError) {
        guard tokens.count <= ProtocolLimits.maxTokensPerRequest else {
            throw .tooLarge(what: "token list \(field) (tokens)", size: UInt64(tokens.count),
                            limit: UInt64(ProtocolLimits.maxTokensPerRequest))
        }
        u32(UInt32(tokens.count))
        for token in tokens { u32(token) }
    }

    /// `u32 count` then each extent; throws past `maxExtents` or for a misaligned extent.
    mutating func wireExtents(_ extents: [WireExtent], field: String) throws(ProtocolError) {
        guard extents.count <= ProtocolLimits.maxExtents else {
            throw .tooLarge(what: "extent list \(field) (extents)", size: UInt64(extents.count),
                            limit: UInt64(ProtocolLimits.maxExtents))
        }
        u32(UInt32(extents.count))
        for extent in extents {
            if let defect = extent.defect { throw .malformed("\(field): \(defect)") }
            u64(extent.offset)
            u64(extent.bytes)
            u32(extent.tokens)
        }
    }
}

/// Reads one body's fields for one message type, turning every overrun, bad count, bad string
/// and trailing byte into a `ProtocolError` that names the message and field.
struct BodyReader {
    private var reader: ByteReader
    /// The message being read, as in "LOOKUP request".
    let context: String

    init(_ body: UnsafeRawBufferPointer, context: String) {
        reader = ByteReader(body)
        self.context = context
    }

    var remaining: Int { reader.remaining }

    /// Fields are checked against the bytes left before `ByteReader` is asked, so a short body
    /// throws once (each throw is costly where a test harness records backtraces).
    private func need(_ count: Int) throws(ProtocolError) {
        guard count <= remaining else {
            throw .malformed("\(context) is truncated: needed \(count) bytes at offset \(reader.offset) but only \(remaining) remain")
        }
    }

    private func truncated(_ error: ByteReader.OutOfBounds) -> ProtocolError {
        .malformed("\(context) is truncated: \(error)")
    }

    mutating func u8() throws(ProtocolError) -> UInt8 {
        try need(1)
        do { return try reader.u8() } catch { throw truncated(error) }
    }
    mutating func u16() throws(ProtocolError) -> UInt16 {
        try need(2)
        do { return try reader.u16() } catch { throw truncated(error) }
    }
    mutating func u32() throws(ProtocolError) -> UInt32 {
        try need(4)
        do { return try reader.u32() } catch { throw truncated(error) }
    }
    mutating func u64() throws(ProtocolError) -> UInt64 {
        try need(8)
        do { return try reader.u64() } catch { throw truncated(error) }
    }
    mutating func f32() throws(ProtocolError) -> Float { Float(bitPattern: try u32()) }

    mutating func bytes(_ count: Int) throws(ProtocolError) -> UnsafeRawBufferPointer {
        try need(count)
        do { return try reader.bytes(count) } catch { throw truncated(error) }
    }

    /// A `u8` that must be 0 or 1.
    mutating func bool(_ field: String) throws(ProtocolError) -> Bool {
        let value = try u8()
        guard value <= 1 else { throw .malformed("\(context): \(field) is \(value), must be 0 or 1") }
        return value == 1
    }

    /// A `u8` of flag bits of which only `known` may be set.
    mutating func flags(_ field: String, known: UInt8) throws(ProtocolError) -> UInt8 {
        let value = try u8()
        guard value & ~known == 0 else {
            throw .malformed("\(context): \(field) 0x\(String(value, radix: 16)) sets bits outside 0x\(String(known, radix: 16))")
        }
        return value
    }

    /// A list count checked against its limit and against the bytes left (at `elementBytes`
    /// each) before anything is allocated.
    mutating func count(_ field: String, limit: Int, elementBytes: Int) throws(ProtocolError) -> Int {
        let count = Int(try u32())
        guard count <= limit else {
            throw .tooLarge(what: "\(context) \(field) (entries)", size: UInt64(count), limit: UInt64(limit))
        }
        guard count * elementBytes <= remaining else {
            throw .malformed("\(context): \(field) announces \(count) entries of at least \(elementBytes) bytes but only \(remaining) bytes remain")
        }
        return count
    }

    /// `u16 length` then UTF-8 of at most `maxStringBytes`.
    mutating func string(_ field: String) throws(ProtocolError) -> String {
        let length = Int(try u16())
        guard length <= ProtocolLimits.maxStringBytes else {
            throw .tooLarge(what: "\(context) string \(field) (UTF-8 bytes)", size: UInt64(length),
                            limit: UInt64(ProtocolLimits.maxStringBytes))
        }
        let raw = try bytes(length)
        guard let string = String(validating: raw.bindMemory(to: UInt8.self), as: UTF8.self) else {
            throw .malformed("\(context): string \(field) is not valid UTF-8")
        }
        return string
    }

    /// `u32 count` then `count × u32`.
    mutating func tokens(_ field: String) throws(ProtocolError) -> [UInt32] {
        let count = try count("token list \(field)", limit: ProtocolLimits.maxTokensPerRequest, elementBytes: 4)
        return try u32Array(count)
    }

    /// `count` little-endian u32 values (count already checked against the bytes left).
    mutating func u32Array(_ count: Int) throws(ProtocolError) -> [UInt32] {
        let raw = try bytes(count * 4)
        return [UInt32](unsafeUninitializedCapacity: count) { buffer, initialized in
            for i in 0..<count { buffer[i] = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: i * 4, as: UInt32.self)) }
            initialized = count
        }
    }

    /// `u32 count` then `count × extent`, each aligned.
    mutating func extents(_ field: String) throws(ProtocolError) -> [WireExtent] {
        let count = try count("extent list \(field)", limit: ProtocolLimits.maxExtents, elementBytes: WireExtent.encodedBytes)
        var extents: [WireExtent] = []
        extents.reserveCapacity(count)
        for _ in 0..<count {
            let extent = WireExtent(offset: try u64(), bytes: try u64(), tokens: try u32())
            if let defect = extent.defect { throw .malformed("\(context): \(field): \(defect)") }
            extents.append(extent)
        }
        return extents
    }

    /// `u64 length` then that many bytes (bounded by the body, itself bounded by its frame limit).
    mutating func inlineBytes(_ field: String) throws(ProtocolError) -> [UInt8] {
        let length = try u64()
        guard length <= UInt64(remaining) else {
            throw .malformed("\(context): inline \(field) announces \(length) bytes but only \(remaining) remain")
        }
        return [UInt8](try bytes(Int(length)))
    }

    /// Every byte must have been read.
    func finish() throws(ProtocolError) {
        guard reader.remaining == 0 else {
            throw .malformed("\(context) has \(reader.remaining) trailing bytes after its last field")
        }
    }
}

/// `bytes.withUnsafeBytes` keeping the typed error (the standard library's `rethrows` erases it).
func withRawBytes<R>(_ bytes: [UInt8], _ body: (UnsafeRawBufferPointer) throws(ProtocolError) -> R) throws(ProtocolError) -> R {
    var failure: ProtocolError?
    let result: R? = bytes.withUnsafeBytes { raw in
        do throws(ProtocolError) { return try body(raw) } catch {
            failure = error
            return nil
        }
    }
    if let failure { throw failure }
    return result!
}
