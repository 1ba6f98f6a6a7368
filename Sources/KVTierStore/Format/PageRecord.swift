import KVTierCodec
import KVTierCore

/// Builds and checks whole records: header, section table, sections, checksum.
public enum PageRecord {
    /// A page record, padded to whole blocks, with every layer of `data` (`shape.layers`
    /// sections of keys then values) encoded straight into it: one buffer, no per-section copies.
    /// Sequence and checksum are left zero for the writer (`resequenced`), which knows the order.
    public static func encode(
        address: PageAddress, modelID: UInt64, codec: Codec, shape: PageShape, data: UnsafeRawBufferPointer,
        createdMicros: UInt64
    ) throws(CodecError) -> [UInt8] {
        let encoder = SectionCodec(codec)
        let section = shape.section
        let part = section.bytesPerPart
        precondition(data.count >= shape.rawBytes, "page data shorter than its shape")
        let tableStart = RecordHeader.size
        let payloadStart = tableStart + 4 * shape.layers
        let capacity = Block.roundUp(payloadStart + shape.layers * encoder.maxEncodedSize(section))
        var failure: CodecError?
        let record = [UInt8](unsafeUninitializedCapacity: capacity) { buffer, count in
            let out = UnsafeMutableRawBufferPointer(buffer)
            var at = payloadStart
            for layer in 0..<shape.layers {
                let base = layer * 2 * part
                do throws(CodecError) {
                    let written = try encoder.encode(
                        keys: UnsafeRawBufferPointer(rebasing: data[base..<base + part]),
                        values: UnsafeRawBufferPointer(rebasing: data[base + part..<base + 2 * part]),
                        shape: section, into: UnsafeMutableRawBufferPointer(rebasing: out[at...]))
                    out.storeBytes(of: UInt32(written).littleEndian, toByteOffset: tableStart + 4 * layer, as: UInt32.self)
                    at += written
                } catch {
                    failure = error
                    count = 0
                    return
                }
            }
            let header = RecordHeader(
                kind: .page, recordBytes: at, sequence: 0, address: address, modelID: modelID, codecTag: codec.tag,
                shape: shape, payloadBytes: at - payloadStart, createdMicros: createdMicros)
            var writer = ByteWriter(capacity: RecordHeader.size)
            header.encode(into: &writer)
            writer.bytes.withUnsafeBytes { out.copyMemory(from: $0) }
            let padded = Block.roundUp(at)
            UnsafeMutableRawBufferPointer(rebasing: out[at..<padded]).initializeMemory(as: UInt8.self, repeating: 0)
            count = padded
        }
        if let failure { throw failure }
        return record
    }

    /// A tombstone deleting the page record of `address` with sequence `deletes`; sealed by the
    /// writer (`sealed`) like every record.
    public static func tombstone(sequence: UInt64, address: PageAddress, deletes: UInt64, createdMicros: UInt64) -> [UInt8] {
        let header = RecordHeader(
            kind: .tombstone, recordBytes: RecordHeader.size, sequence: sequence, address: address, modelID: 0,
            codecTag: 0, shape: PageShape(tokens: 0, layers: 0, kvHeads: 0, headDim: 0), payloadBytes: 0,
            createdMicros: createdMicros, deletesSequence: deletes)
        var writer = ByteWriter(capacity: Block.size)
        header.encode(into: &writer)
        writer.zeros(header.paddedBytes - header.recordBytes)
        return writer.bytes
    }

    /// `record` (any version, e.g. a compaction copy of a version 1 record) made a record of a
    /// segment in `format` (version 2): its sequence, the acknowledged end of its group, its CRC
    /// and its tag. Only the writer calls this; it is the one place tags are made.
    public static func sealed(_ record: [UInt8], sequence: UInt64, acknowledgedBlocks: UInt32, format: SegmentFormat) -> [UInt8] {
        precondition(format.version == UInt32(RecordHeader.version), "records are written only into current-version segments")
        let key = format.recordKey!
        var copy = record
        copy.withUnsafeMutableBytes { out in
            let recordBytes = Int(UInt32(littleEndian: out.loadUnaligned(fromByteOffset: 8, as: UInt32.self)))
            out.storeBytes(of: RecordHeader.version.littleEndian, toByteOffset: 4, as: UInt16.self)
            out.storeBytes(of: sequence.littleEndian, toByteOffset: 16, as: UInt64.self)
            out.storeBytes(of: acknowledgedBlocks.littleEndian, toByteOffset: RecordHeader.acknowledgedOffset, as: UInt32.self)
            out.storeBytes(of: UInt64(0), toByteOffset: RecordHeader.tagOffset, as: UInt64.self)
            let crc = checksum(UnsafeRawBufferPointer(rebasing: out[0..<recordBytes]), version: RecordHeader.version)
            out.storeBytes(of: crc.littleEndian, toByteOffset: RecordHeader.checksumOffset, as: UInt32.self)
            let tag = KeyedDigest.tag(key: key, UnsafeRawBufferPointer(rebasing: out[0..<RecordHeader.tagOffset]))
            out.storeBytes(of: tag.littleEndian, toByteOffset: RecordHeader.tagOffset, as: UInt64.self)
        }
        return copy
    }

    /// Checks a record header at a record start of a segment in `format`: its fields, that its
    /// version is the segment's, and (version 2) its tag. A header that passes was written by
    /// the daemon into this segment, so its length can be trusted to find the next record;
    /// bytes a client chose (a page's payload) never pass.
    public static func authenticate(_ bytes: UnsafeRawBufferPointer, format: SegmentFormat) throws(FormatError) -> RecordHeader {
        let header = try RecordHeader(decoding: bytes)
        guard UInt32(header.version) == format.version else {
            throw .inconsistent("a version \(header.version) record in a version \(format.version) segment")
        }
        if let key = format.recordKey {
            let computed = KeyedDigest.tag(key: key, UnsafeRawBufferPointer(rebasing: bytes[0..<RecordHeader.tagOffset]))
            guard computed == header.tag else { throw .unauthenticated("record header at this offset") }
        }
        return header
    }

    /// Checks a record held in `bytes` (at least `recordBytes` long) of a segment in `format`
    /// and returns its header.
    public static func verify(_ bytes: UnsafeRawBufferPointer, format: SegmentFormat) throws(FormatError) -> RecordHeader {
        let header = try authenticate(bytes, format: format)
        try verifyPayload(bytes, header)
        return header
    }

    /// Checks the CRC of a record whose header `authenticate` accepted.
    public static func verifyPayload(_ bytes: UnsafeRawBufferPointer, _ header: RecordHeader) throws(FormatError) {
        guard header.recordBytes <= bytes.count else { throw .truncated("record") }
        let computed = checksum(UnsafeRawBufferPointer(rebasing: bytes[0..<header.recordBytes]), version: header.version)
        guard computed == header.checksum else {
            throw .checksumMismatch("record \(header.address) (sequence \(header.sequence))", stored: header.checksum, computed: computed)
        }
    }

    /// The CRC of a record with its checksum field (and, from version 2, its tag) taken as zero.
    static func checksum(_ record: UnsafeRawBufferPointer, version: UInt16) -> UInt32 {
        let zero = [UInt8](repeating: 0, count: 8)
        var crc = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: record[0..<RecordHeader.checksumOffset]))
        crc = CRC32C.checksum([0, 0, 0, 0], continuing: crc)
        guard version >= 2, record.count >= RecordHeader.size else {
            return CRC32C.checksum(UnsafeRawBufferPointer(rebasing: record[(RecordHeader.checksumOffset + 4)...]), continuing: crc)
        }
        crc = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: record[(RecordHeader.checksumOffset + 4)..<RecordHeader.tagOffset]), continuing: crc)
        crc = CRC32C.checksum(zero, continuing: crc)
        return CRC32C.checksum(UnsafeRawBufferPointer(rebasing: record[RecordHeader.size...]), continuing: crc)
    }

    /// Decodes every section of a verified page record into `output` (at least
    /// `header.shape.rawBytes`): the page in page layout, layer by layer, keys then values.
    public static func decodePage(_ record: UnsafeRawBufferPointer, _ header: RecordHeader, into output: UnsafeMutableRawBufferPointer) throws {
        precondition(output.count >= header.shape.rawBytes, "decode output shorter than the page")
        let codec = try Codec(tag: header.codecTag)
        let sections = try sections(of: record, header)
        let sectionShape = header.shape.section
        let part = sectionShape.bytesPerPart
        let decoder = SectionCodec(codec)
        for (layer, section) in sections.enumerated() {
            let base = layer * 2 * part
            try decoder.decode(
                section, shape: sectionShape,
                keys: UnsafeMutableRawBufferPointer(rebasing: output[base..<base + part]),
                values: UnsafeMutableRawBufferPointer(rebasing: output[base + part..<base + 2 * part]))
        }
    }

    /// The encoded sections of a verified page record, in layer order.
    public static func sections(of record: UnsafeRawBufferPointer, _ header: RecordHeader) throws(FormatError) -> [UnsafeRawBufferPointer] {
        var reader = ByteReader(record, offset: RecordHeader.size)
        var lengths: [Int] = []
        var total = 0
        do {
            for _ in 0..<header.shape.layers {
                let length = Int(try reader.u32())
                lengths.append(length)
                total += length
            }
            guard total == header.payloadBytes else {
                throw FormatError.inconsistent("section table sums to \(total), header says \(header.payloadBytes)")
            }
            return try lengths.map { (length) throws(ByteReader.OutOfBounds) in try reader.bytes(length) }
        } catch let error as FormatError {
            throw error
        } catch {
            throw .truncated("record sections")
        }
    }
}
