import KVTierCodec
import KVTierCore

/// A page record as the remote tier stores it (docs/format.md, "Remote records"): the disk
/// tier's page record (header, section table, sections, CRC-32C) behind a 48-byte envelope whose
/// MAC, keyed by the secret every daemon of a deployment shares (`remoteKeyFile`), covers the
/// envelope and the whole record.
///
/// Remote bytes are untrusted: a shared or compromised Redis can hold anything under any key.
/// `open` serves a value only when its MAC proves a daemon holding the key wrote it, its CRC
/// matches, and its header names the very page asked for (tenant, key, model, shape). A value
/// moved to another tenant's key, or to another page's, fails the address check; one written
/// without the key fails the MAC.
public enum RemoteRecord {
    public static let magic: UInt32 = 0x5254_564B  // "KVTR"
    public static let version: UInt16 = 1
    public static let envelopeBytes = 48
    static let macOffset = 16

    /// The value to store for `record` (a page record as `PageRecord.encode` makes it, or one read
    /// back from a segment, block padding allowed): its CRC recomputed with sequence,
    /// acknowledged end and tag zeroed (they mean something only in the segment that held it),
    /// then the envelope and its MAC. Nil for bytes that are not a page record.
    public static func seal(_ record: UnsafeRawBufferPointer, key: DigestKey) -> [UInt8]? {
        guard let header = try? RecordHeader(decoding: record), header.kind == .page, header.recordBytes <= record.count else { return nil }
        let length = header.recordBytes
        return [UInt8](unsafeUninitializedCapacity: envelopeBytes + length) { buffer, count in
            let out = UnsafeMutableRawBufferPointer(buffer)
            let body = UnsafeMutableRawBufferPointer(rebasing: out[envelopeBytes..<envelopeBytes + length])
            body.copyMemory(from: UnsafeRawBufferPointer(rebasing: record[0..<length]))
            body.storeBytes(of: RecordHeader.version.littleEndian, toByteOffset: 4, as: UInt16.self)
            body.storeBytes(of: UInt64(0), toByteOffset: 16, as: UInt64.self)
            body.storeBytes(of: UInt32(0), toByteOffset: RecordHeader.acknowledgedOffset, as: UInt32.self)
            body.storeBytes(of: UInt64(0), toByteOffset: RecordHeader.tagOffset, as: UInt64.self)
            let crc = PageRecord.checksum(UnsafeRawBufferPointer(body), version: RecordHeader.version)
            body.storeBytes(of: crc.littleEndian, toByteOffset: RecordHeader.checksumOffset, as: UInt32.self)
            out.storeBytes(of: magic.littleEndian, toByteOffset: 0, as: UInt32.self)
            out.storeBytes(of: version.littleEndian, toByteOffset: 4, as: UInt16.self)
            out.storeBytes(of: UInt16(0), toByteOffset: 6, as: UInt16.self)
            out.storeBytes(of: UInt32(length).littleEndian, toByteOffset: 8, as: UInt32.self)
            out.storeBytes(of: UInt32(0), toByteOffset: 12, as: UInt32.self)
            KeyedDigest.mac(key: key, [UnsafeRawBufferPointer(rebasing: out[0..<macOffset]), UnsafeRawBufferPointer(body)],
                            into: UnsafeMutableRawBufferPointer(rebasing: out[macOffset..<envelopeBytes]))
            count = envelopeBytes + length
        }
    }

    /// Why a remote value was not served.
    public enum Rejection: Error, Equatable, Sendable, CustomStringConvertible {
        /// Not a sealed record of this version (too short, wrong magic, version or length).
        case malformed(String)
        /// The MAC does not match: not written with this deployment's key (or altered since).
        case unauthenticated
        /// Authentic, but not the page asked for, or its bytes fail the record's own checks.
        case mismatch(String)

        public var description: String {
            switch self {
            case .malformed(let why): "remote value is malformed: \(why)"
            case .unauthenticated: "remote value fails its MAC: not written with this deployment's remoteKeyFile, or altered"
            case .mismatch(let why): "remote value is not the page asked for: \(why)"
            }
        }
    }

    /// Checks a value fetched for `address` of `model` and decodes its page into `output`
    /// (`model.pageShape(tokens:).rawBytes` of the page it holds, a whole page); returns the
    /// page's token count. Nothing is written to `output` unless every check passed.
    public static func open(_ value: UnsafeRawBufferPointer, key: DigestKey, address: PageAddress, model: ModelSpec,
                            into output: UnsafeMutableRawBufferPointer) throws(Rejection) -> Int {
        guard value.count >= envelopeBytes + RecordHeader.size else { throw .malformed("\(value.count) bytes") }
        guard UInt32(littleEndian: value.loadUnaligned(fromByteOffset: 0, as: UInt32.self)) == magic,
              UInt16(littleEndian: value.loadUnaligned(fromByteOffset: 4, as: UInt16.self)) == version,
              value.loadUnaligned(fromByteOffset: 6, as: UInt16.self) == 0,
              value.loadUnaligned(fromByteOffset: 12, as: UInt32.self) == 0 else {
            throw .malformed("not a version \(version) remote record")
        }
        let length = Int(UInt32(littleEndian: value.loadUnaligned(fromByteOffset: 8, as: UInt32.self)))
        guard length == value.count - envelopeBytes else { throw .malformed("envelope says \(length) record bytes, \(value.count - envelopeBytes) came") }
        let record = UnsafeRawBufferPointer(rebasing: value[envelopeBytes...])
        var computed = (UInt64(0), UInt64(0), UInt64(0), UInt64(0))
        let authentic = withUnsafeMutableBytes(of: &computed) { mac -> Bool in
            KeyedDigest.mac(key: key, [UnsafeRawBufferPointer(rebasing: value[0..<macOffset]), record], into: mac)
            return KeyedDigest.macsEqual(UnsafeRawBufferPointer(mac), UnsafeRawBufferPointer(rebasing: value[macOffset..<envelopeBytes]))
        }
        guard authentic else { throw .unauthenticated }
        let header: RecordHeader
        do {
            header = try RecordHeader(decoding: record)
            guard header.kind == .page, header.version == RecordHeader.version, header.recordBytes == length else {
                throw FormatError.inconsistent("not a version \(RecordHeader.version) page record of \(length) bytes")
            }
            try PageRecord.verifyPayload(record, header)
        } catch {
            throw .mismatch("\(error)")
        }
        guard header.address == address else { throw .mismatch("it holds page \(header.address)") }
        guard header.modelID == model.id else { throw .mismatch("it holds a page of model \(header.modelID)") }
        guard header.shape == model.pageShape(tokens: model.pageTokens) else {
            throw .mismatch("its shape \(header.shape) is not a whole page of the model")
        }
        guard output.count >= header.shape.rawBytes else { throw .mismatch("page of \(header.shape.rawBytes) bytes does not fit \(output.count)") }
        do { try PageRecord.decodePage(record, header, into: output) } catch { throw .mismatch("\(error)") }
        return header.shape.tokens
    }

    /// The most bytes a sealed whole page of `model` can take: what the reader of a remote
    /// store bounds each value by, so a hostile store cannot make it allocate more.
    public static func maxValueBytes(_ model: ModelSpec) -> Int {
        let shape = model.pageShape(tokens: model.pageTokens)
        // Every codec's worst case is within the raw section plus its frame; twice that per
        // layer bounds any encoding with room to spare.
        return envelopeBytes + RecordHeader.size + 4 * shape.layers + 2 * shape.rawBytes + 4096
    }
}
