import KVTierCodec
import KVTierCore

/// The shape of a page: what a record stores besides its key. The model's shape (`ModelShape`)
/// and how many tokens the page holds.
@dynamicMemberLookup
public struct PageShape: Hashable, Sendable, CustomStringConvertible {
    public var tokens: Int
    public var model: ModelShape

    public init(tokens: Int, model: ModelShape) {
        self.tokens = tokens
        self.model = model
    }

    public init(tokens: Int, layers: Int, kvHeads: Int, headDim: Int, elementType: ElementType = .float16) {
        self.init(tokens: tokens, model: ModelShape(layers: layers, kvHeads: kvHeads, headDim: headDim, elementType: elementType))
    }

    /// The model shape's fields and sizes (`layers`, `kvHeads`, `bytesPerToken`, …), read and
    /// written through `model`.
    public subscript<Value>(dynamicMember field: WritableKeyPath<ModelShape, Value>) -> Value {
        get { model[keyPath: field] }
        set { model[keyPath: field] = newValue }
    }

    /// The shape of one layer's section.
    public var section: SectionShape {
        SectionShape(tokens: tokens, kvHeads: model.kvHeads, headDim: model.headDim, elementType: model.elementType)
    }

    /// Bytes of the whole page as 16-bit elements: layers × (keys + values).
    public var rawBytes: Int { model.pageBytes(tokens: tokens) }

    public var description: String { "\(model.layers)×[\(tokens), \(model.kvHeads), \(model.headDim)] \(model.elementType)" }
}

/// The 96-byte header of a record (docs/format.md, "Records").
public struct RecordHeader: Equatable, Sendable {
    public enum Kind: UInt16, Sendable {
        case page = 1
        case tombstone = 2
    }

    public static let magic: UInt32 = 0x5250_564B  // "KVPR"
    /// Version 2 (in version 2 segments): field 68 holds the acknowledged end, field 88 the tag.
    public static let version: UInt16 = 2
    public static let size = 96
    public static let checksumOffset = 12
    public static let acknowledgedOffset = 68
    public static let tagOffset = 88

    /// 1 or 2: the version of the segment that holds the record.
    public var version: UInt16
    public var kind: Kind
    /// Header + section table + sections, without block padding.
    public var recordBytes: Int
    public var checksum: UInt32
    public var sequence: UInt64
    public var address: PageAddress
    public var modelID: UInt64
    public var codecTag: UInt32
    public var shape: PageShape
    public var payloadBytes: Int
    public var createdMicros: UInt64
    /// For a tombstone: the sequence of the page record it deletes.
    public var deletesSequence: UInt64
    /// Version 2: where the segment's synced bytes ended when this record's group was written, in
    /// blocks. Everything below was durable (acknowledged) before this record existed, so damage
    /// there is corruption, never a torn write.
    public var acknowledgedBlocks: UInt32
    /// Version 2: BLAKE2b-64 keyed by the segment's secret over header bytes 0..<88 (the CRC
    /// included): a record only the daemon can have written. Clients never see the key.
    public var tag: UInt64

    public init(kind: Kind, recordBytes: Int, checksum: UInt32 = 0, sequence: UInt64, address: PageAddress,
                modelID: UInt64, codecTag: UInt32, shape: PageShape, payloadBytes: Int, createdMicros: UInt64,
                deletesSequence: UInt64 = 0, version: UInt16 = RecordHeader.version, acknowledgedBlocks: UInt32 = 0, tag: UInt64 = 0) {
        self.version = version
        self.acknowledgedBlocks = acknowledgedBlocks
        self.tag = tag
        self.kind = kind
        self.recordBytes = recordBytes
        self.checksum = checksum
        self.sequence = sequence
        self.address = address
        self.modelID = modelID
        self.codecTag = codecTag
        self.shape = shape
        self.payloadBytes = payloadBytes
        self.createdMicros = createdMicros
        self.deletesSequence = deletesSequence
    }

    /// Bytes on disk including padding to the next block.
    public var paddedBytes: Int { Block.roundUp(recordBytes) }

    public func encode(into writer: inout ByteWriter) {
        writer.u32(Self.magic)
        writer.u16(version)
        writer.u16(kind.rawValue)
        writer.u32(UInt32(recordBytes))
        writer.u32(checksum)
        writer.u64(sequence)
        writer.key(address.key)
        writer.u64(modelID)
        writer.u32(address.tenant.rawValue)
        writer.u32(codecTag)
        writer.u32(UInt32(shape.tokens))
        writer.u16(UInt16(shape.layers))
        writer.u16(UInt16(shape.kvHeads))
        writer.u16(UInt16(shape.headDim))
        writer.u8(kind == .page ? shape.elementType.rawValue : 0)
        writer.u8(0)
        writer.u32(version == 1 ? UInt32(payloadBytes) : acknowledgedBlocks)
        writer.u64(createdMicros)
        writer.u64(deletesSequence)
        writer.u64(version == 1 ? 0 : tag)
    }

    /// Parses and checks the header's own fields; the checksum over the record is checked by
    /// `RecordCodec.verify` once the whole record is in memory.
    public init(decoding bytes: UnsafeRawBufferPointer) throws(FormatError) {
        guard bytes.count >= Self.size else { throw .truncated("record header") }
        var r = ByteReader(bytes)
        do {
            guard try r.u32() == Self.magic else { throw FormatError.badMagic("record") }
            let version = try r.u16()
            guard version == 1 || version == Self.version else { throw FormatError.unsupportedVersion("record", UInt32(version)) }
            self.version = version
            guard let kind = Kind(rawValue: try r.u16()) else { throw FormatError.inconsistent("unknown record kind") }
            self.kind = kind
            recordBytes = Int(try r.u32())
            checksum = try r.u32()
            sequence = try r.u64()
            let key = try r.key()
            modelID = try r.u64()
            address = PageAddress(tenant: TenantID(try r.u32()), key: key)
            codecTag = try r.u32()
            let tokens = Int(try r.u32())
            let layers = Int(try r.u16())
            let kvHeads = Int(try r.u16())
            let headDim = Int(try r.u16())
            let elementRaw = try r.u8()
            // No flags are defined in version 1; a set bit means a newer writer's feature.
            let flags = try r.u8()
            guard flags == 0 else { throw FormatError.unsupportedVersion("record flags", UInt32(flags)) }
            let field68 = try r.u32()
            createdMicros = try r.u64()
            deletesSequence = try r.u64()
            let field88 = try r.u64()
            if version == 1 {
                payloadBytes = Int(field68)
                acknowledgedBlocks = 0
                tag = 0
            } else {
                // Version 2 derives the payload length from the record length (it was redundant).
                acknowledgedBlocks = field68
                tag = field88
                payloadBytes = kind == .page ? recordBytes - Self.size - 4 * layers : 0
            }
            switch kind {
            case .page:
                guard let elementType = ElementType(rawValue: elementRaw) else {
                    throw FormatError.inconsistent("unknown element type \(elementRaw)")
                }
                let model = ModelShape(layers: layers, kvHeads: kvHeads, headDim: headDim, elementType: elementType)
                guard tokens >= 1, tokens <= Limits.maxPageTokens, model.limitViolation == nil
                else { throw FormatError.inconsistent("page shape \(layers)×[\(tokens), \(kvHeads), \(headDim)] is out of range") }
                shape = PageShape(tokens: tokens, model: model)
                guard payloadBytes >= 0, recordBytes == Self.size + 4 * layers + payloadBytes else {
                    throw FormatError.inconsistent("record length \(recordBytes) does not match \(layers) layers and \(payloadBytes) payload bytes")
                }
            case .tombstone:
                shape = PageShape(tokens: 0, layers: 0, kvHeads: 0, headDim: 0)
                guard recordBytes == Self.size, payloadBytes == 0 else {
                    throw FormatError.inconsistent("tombstone with a payload")
                }
            }
        } catch let error as FormatError {
            throw error
        } catch {
            throw .truncated("record header")
        }
    }
}
