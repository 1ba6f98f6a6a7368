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

    /// A tombstone deleting the page record of `address` with sequence `deletes`.
    public static func tombstone(sequence: UInt64, address: PageAddress, deletes: UInt64, createdMicros: UInt64) -> [UInt8] {
        let header = RecordHeader(
            kind: .tombstone, recordBytes: RecordHeader.size, sequence: sequence, address: address, modelID: 0,
            codecTag: 0, shape: PageShape(tokens: 0, layers: 0, kvHeads: 0, headDim: 0), payloadBytes: 0,
            createdMicros: createdMicros, deletesSequence: deletes)
        var writer = ByteWriter(capacity: Block.size)
        header.encode(into: &writer)
        return sealed(writer, header)
    }

    private static func sealed(_ unpadded: ByteWriter, _ header: RecordHeader) -> [UInt8] {
        var writer = unpadded
        precondition(writer.count == header.recordBytes, "record length bookkeeping is wrong")
        writer.patchU32(CRC32C.checksum(writer.bytes), at: RecordHeader.checksumOffset)
        writer.zeros(header.paddedBytes - header.recordBytes)
        return writer.bytes
    }

    /// Checks a record held in `bytes` (at least `recordBytes` long) and returns its header.
    public static func verify(_ bytes: UnsafeRawBufferPointer) throws(FormatError) -> RecordHeader {
        let header = try RecordHeader(decoding: bytes)
        guard header.recordBytes <= bytes.count else { throw .truncated("record") }
        let computed = checksum(UnsafeRawBufferPointer(rebasing: bytes[0..<header.recordBytes]))
        guard computed == header.checksum else {
            throw .checksumMismatch("record \(header.address) (sequence \(header.sequence))", stored: header.checksum, computed: computed)
        }
        return header
    }

    /// The CRC of a record with its checksum field taken as zero.
    static func checksum(_ record: UnsafeRawBufferPointer) -> UInt32 {
        let zero = [UInt8](repeating: 0, count: 4)
        var crc = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: record[0..<RecordHeader.checksumOffset]))
        crc = CRC32C.checksum(zero, continuing: crc)
        return CRC32C.checksum(UnsafeRawBufferPointer(rebasing: record[(RecordHeader.checksumOffset + 4)...]), continuing: crc)
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
