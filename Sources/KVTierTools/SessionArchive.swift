#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import KVTierClient
import KVTierCore

/// A portable, checksummed session file (`kvtier export` / `kvtier import`; docs/format.md,
/// "Session archive"): the model's registration, the session's settings and tokens, and its KV
/// at full 16-bit precision, so it restores exactly on any kvtierd.
public struct SessionArchive: Equatable, Sendable {
    public static let magic: UInt64 = 0x0158_5345_5354_564B  // "KVTSESX\1"
    public static let version: UInt32 = 1
    /// Header flag: the model has a disk codec, whose name (a string) follows `ropeTheta`. Only
    /// set when it has one, so an archive of any other model is as version 1 always wrote it.
    public static let flagDiskCodec: UInt32 = 1 << 0
    /// Largest archive `read` accepts (bounds the allocation a damaged length could ask for).
    public static let maxBytes = 64 << 30

    public var modelID: UInt64
    public var model: ModelSpecification
    public var name: String
    public var ttlSeconds: UInt32
    public var pinned: Bool
    public var tokens: [UInt32]
    /// `[layers, tokens, kvHeads, headDim]` 16-bit bit patterns each.
    public var keys: [UInt16]
    public var values: [UInt16]

    public init(modelID: UInt64, model: ModelSpecification, name: String, ttlSeconds: UInt32, pinned: Bool,
                tokens: [UInt32], keys: [UInt16], values: [UInt16]) {
        self.modelID = modelID
        self.model = model
        self.name = name
        self.ttlSeconds = ttlSeconds
        self.pinned = pinned
        self.tokens = tokens
        self.keys = keys
        self.values = values
    }

    public enum ArchiveError: Error, Equatable, CustomStringConvertible {
        case io(String)
        case invalid(String)

        public var description: String {
            switch self {
            case .io(let why): why
            case .invalid(let why): "not a valid session archive: \(why)"
            }
        }
    }

    /// The archive's bytes: header, KV, CRC-32C of everything before it.
    public func encoded() throws(ArchiveError) -> [UInt8] {
        let elements = model.shape.elements(tokens: tokens.count)
        guard keys.count == elements, values.count == elements else {
            throw .invalid("\(tokens.count) tokens of this model need \(elements) key and value elements, not \(keys.count) and \(values.count)")
        }
        var w = ByteWriter(capacity: 128 + name.utf8.count + model.name.utf8.count + model.diskCodec.utf8.count + 4 * tokens.count + 4 * elements)
        w.u64(Self.magic)
        w.u32(Self.version)
        w.u32(model.diskCodec.isEmpty ? 0 : Self.flagDiskCodec)
        w.u64(modelID)
        Self.string(model.name, &w)
        w.u16(UInt16(model.layers))
        w.u16(UInt16(model.kvHeads))
        w.u16(UInt16(model.headDim))
        w.u8(model.elementType.rawValue)
        w.u8(0)
        w.u16(UInt16(model.pageTokens))
        w.u32(model.ropeTheta.bitPattern)
        if !model.diskCodec.isEmpty { Self.string(model.diskCodec, &w) }
        Self.string(name, &w)
        w.u32(ttlSeconds)
        w.u8(pinned ? 1 : 0)
        w.u32(UInt32(tokens.count))
        for token in tokens { w.u32(token) }
        w.u64(UInt64(4 * elements))
        keys.withUnsafeBytes { w.raw($0) }
        values.withUnsafeBytes { w.raw($0) }
        w.u32(CRC32C.checksum(w.bytes))
        return w.bytes
    }

    public init(decoding bytes: [UInt8]) throws(ArchiveError) {
        guard bytes.count >= 4 else { throw .invalid("\(bytes.count) bytes is too short") }
        let body = bytes.count - 4
        let stored = bytes.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: body, as: UInt32.self)) }
        let computed = bytes.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<body])) }
        let parsed: Result<SessionArchive, ArchiveError> = bytes.withUnsafeBytes { raw in
            var r = ByteReader(UnsafeRawBufferPointer(rebasing: raw[0..<body]))
            do {
                guard try r.u64() == Self.magic else { return .failure(.invalid("wrong magic (not written by kvtier export)")) }
                let version = try r.u32()
                guard version == Self.version else { return .failure(.invalid("version \(version); this kvtier reads version \(Self.version)")) }
                let flags = try r.u32()
                guard flags & ~Self.flagDiskCodec == 0 else { return .failure(.invalid("flags set that this version does not know")) }
                guard stored == computed else {
                    return .failure(.invalid("checksum mismatch (stored 0x\(String(stored, radix: 16)), computed 0x\(String(computed, radix: 16))): the file is damaged"))
                }
                let modelID = try r.u64()
                let modelName = try Self.string(&r)
                let layers = Int(try r.u16()), kvHeads = Int(try r.u16()), headDim = Int(try r.u16())
                // Checked before any size is computed from them: their product must not overflow.
                guard (1...Limits.maxLayers).contains(layers), (1...Limits.maxKVHeads).contains(kvHeads),
                      (1...Limits.maxHeadDim).contains(headDim) else {
                    return .failure(.invalid("model shape \(layers) layers × \(kvHeads) KV heads × \(headDim) head dim is out of range"))
                }
                guard let elementType = ElementType(rawValue: try r.u8()) else { return .failure(.invalid("unknown element type")) }
                guard try r.u8() == 0 else { return .failure(.invalid("a reserved byte is set")) }
                let pageTokens = Int(try r.u16())
                let rope = Float(bitPattern: try r.u32())
                let diskCodec = flags & Self.flagDiskCodec != 0 ? try Self.string(&r) : ""
                guard flags & Self.flagDiskCodec == 0 || !diskCodec.isEmpty else { return .failure(.invalid("the disk codec flag is set but its name is empty")) }
                let model = ModelSpecification(name: modelName, layers: layers, kvHeads: kvHeads, headDim: headDim,
                                               elementType: elementType, pageTokens: pageTokens, ropeTheta: rope, diskCodec: diskCodec)
                let name = try Self.string(&r)
                let ttl = try r.u32()
                let pinnedByte = try r.u8()
                guard pinnedByte <= 1 else { return .failure(.invalid("pinned is \(pinnedByte), not 0 or 1")) }
                let pinned = pinnedByte == 1
                let count = Int(try r.u32())
                guard count * 4 <= r.remaining else { return .failure(.invalid("\(count) tokens do not fit the file")) }
                var tokens = [UInt32]()
                tokens.reserveCapacity(count)
                for _ in 0..<count { tokens.append(try r.u32()) }
                let elements = model.shape.elements(tokens: count)
                guard try r.u64() == UInt64(4 * elements), r.remaining == 4 * elements else {
                    return .failure(.invalid("the KV is not the size \(count) tokens of this model take"))
                }
                let kv = try r.bytes(4 * elements)
                let keys = [UInt16](unsafeUninitializedCapacity: elements) { buffer, n in
                    UnsafeMutableRawBufferPointer(buffer).copyMemory(from: UnsafeRawBufferPointer(rebasing: kv[0..<2 * elements]))
                    n = elements
                }
                let values = [UInt16](unsafeUninitializedCapacity: elements) { buffer, n in
                    UnsafeMutableRawBufferPointer(buffer).copyMemory(from: UnsafeRawBufferPointer(rebasing: kv[(2 * elements)...]))
                    n = elements
                }
                return .success(SessionArchive(modelID: modelID, model: model, name: name, ttlSeconds: ttl, pinned: pinned,
                                               tokens: tokens, keys: keys, values: values))
            } catch {
                return .failure(.invalid("truncated (\(error))"))
            }
        }
        self = try parsed.get()
    }

    /// Writes the archive to `path` (through a temporary file renamed into place).
    public func write(to path: String) throws(ArchiveError) {
        let bytes = try encoded()
        let temporary = path + ".partial"
        guard let file = fopen(temporary, "wb") else { throw .io("cannot create \(temporary): \(String(cString: strerror(errno)))") }
        let written = bytes.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, file) }
        let flushed = fflush(file) == 0 && fsync(fileno(file)) == 0
        fclose(file)
        guard written == bytes.count, flushed, rename(temporary, path) == 0 else {
            let why = String(cString: strerror(errno))
            unlink(temporary)
            throw .io("cannot write \(path): \(why)")
        }
    }

    public static func read(from path: String) throws(ArchiveError) -> SessionArchive {
        guard let file = fopen(path, "rb") else { throw .io("cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { fclose(file) }
        fseeko(file, 0, SEEK_END)
        let size = Int(ftello(file))
        fseeko(file, 0, SEEK_SET)
        guard size >= 0, size <= maxBytes else { throw .invalid("\(path) is \(size) bytes, over the \(maxBytes)-byte limit") }
        var bytes = [UInt8](repeating: 0, count: size)
        let read = bytes.withUnsafeMutableBytes { fread($0.baseAddress, 1, size, file) }
        guard read == size else { throw .io("cannot read \(path): \(String(cString: strerror(errno)))") }
        return try SessionArchive(decoding: bytes)
    }

    private static func string(_ s: String, _ w: inout ByteWriter) {
        w.u16(UInt16(s.utf8.count))
        w.raw(s.utf8)
    }

    private static func string(_ r: inout ByteReader) throws -> String {
        let n = Int(try r.u16())
        guard let s = String(validating: try r.bytes(n), as: UTF8.self) else { throw ArchiveError.invalid("a name is not UTF-8") }
        return s
    }
}
