import KVTierCodec
import KVTierCore
import Logging

/// One change to the catalog of models and sessions (docs/format.md, "Catalog journal").
enum CatalogEntry: Equatable, Sendable {
    /// A model registered (its shape is needed to find a session's pages after a restart, its
    /// disk codec to write them as the client asked).
    case model(ModelSpec)
    /// A session created, replaced or forked: everything about it.
    case session(Session)
    /// A session's tokens extended: the first `keep` tokens stay, `appended` follow.
    case extend(SessionID, keep: Int, appended: [UInt32], lastUsedMicros: UInt64)
    /// A session's pin, TTL and last use changed.
    case settings(SessionID, pinned: Bool, ttlSeconds: UInt32, lastUsedMicros: UInt64)
    case delete(SessionID)

    enum Kind: UInt8 {
        case model = 1, session = 2, extend = 3, settings = 4, delete = 5
    }
}

/// What the journal holds after replay.
struct CatalogSnapshot: Sendable {
    var models: [UInt64: ModelSpec] = [:]
    var sessions: [SessionID: Session] = [:]

    /// Applies one entry; false when it cannot apply (names a session that does not exist, or
    /// keeps more tokens than it has), which replay reports as corruption.
    mutating func apply(_ entry: CatalogEntry) -> Bool {
        switch entry {
        case .model(let model):
            models[model.id] = model
        case .session(let session):
            sessions[session.id] = session
        case .extend(let id, let keep, let appended, let lastUsed):
            guard var session = sessions[id], keep <= session.tokens.count else { return false }
            session.tokens.removeSubrange(keep...)
            session.tokens += appended
            session.lastUsedMicros = lastUsed
            sessions[id] = session
        case .settings(let id, let pinned, let ttl, let lastUsed):
            guard sessions[id] != nil else { return false }
            sessions[id]!.pinned = pinned
            sessions[id]!.ttlSeconds = ttl
            sessions[id]!.lastUsedMicros = lastUsed
        case .delete(let id):
            guard sessions.removeValue(forKey: id) != nil else { return false }
        }
        return true
    }
}

/// The catalog's append-only journal: a header, then checksummed records, each one
/// `CatalogEntry`. Appends are made durable with `sync`; replay keeps the longest valid prefix
/// (a torn last record is the normal result of a crash) and rewrites the file when it has grown
/// well past what it describes.
///
/// Not thread-safe: `SessionCatalog` owns it under its lock.
final class CatalogJournal {
    static let fileName = "CATALOG"
    static let temporaryName = "CATALOG.tmp"
    static let magic: UInt64 = 0x0100_5441_4354_564B  // "KVTCAT\0\1"
    static let version: UInt32 = 1
    static let headerBytes = 16
    /// Largest record body replay accepts: a session of `maxTokensPerRecord` tokens with room
    /// for its name and fields.
    static let maxTokensPerRecord = 1 << 22
    static let maxRecordBytes = 64 + Session.maxNameBytes + 4 * maxTokensPerRecord

    let storage: any Storage
    let logger: Logger
    private var file: any StorageFile
    /// Bytes in the file: where the next record goes.
    private(set) var size: Int
    /// Set when a failed append could not be undone: the file may hold a change memory lacks.
    private var broken: StorageError?

    private init(storage: any Storage, logger: Logger, file: any StorageFile, size: Int) {
        self.storage = storage
        self.logger = logger
        self.file = file
        self.size = size
    }

    deinit { file.close() }

    /// Opens (or creates) the journal at the storage root and replays it.
    static func open(storage: any Storage, logger: Logger) throws(StorageError) -> (CatalogJournal, CatalogSnapshot) {
        if storage.exists(temporaryName) { try storage.remove(temporaryName) }  // an interrupted rewrite
        let file = try storage.open(fileName, .readWriteCreate)
        let length = try file.size()
        if length < headerBytes {
            // New (or torn while being created, before anything was acknowledged).
            try file.truncate(to: 0)
            try file.write(header(), at: 0)
            try file.sync()
            try storage.syncDirectory("")
            return (CatalogJournal(storage: storage, logger: logger, file: file, size: headerBytes), CatalogSnapshot())
        }
        var bytes = [UInt8](repeating: 0, count: length)
        let outcome = bytes.withUnsafeMutableBytes { buffer in
            Result { () throws(StorageError) in try file.read(into: buffer, at: 0) }
        }
        guard try outcome.get() == length else { throw StorageError(.io, "read", fileName) }
        let replay = replay(bytes)
        guard replay.headerValid else {
            // Not a catalog this version can read: keep it aside rather than overwrite it.
            file.close()
            let aside = "\(fileName).unreadable-\(Clocks.wallMicros())"
            try storage.rename(fileName, aside)
            logger.error("catalog journal header is not valid; kept aside, starting with no sessions", metadata: ["file": "\(aside)"])
            return try open(storage: storage, logger: logger)
        }
        if replay.validBytes < length {
            if replay.corruptBeforeEnd {
                let aside = "\(fileName).corrupt-\(Clocks.wallMicros())"
                let copy = try storage.open(aside, .readWriteCreate)
                try copy.write(bytes, at: 0)
                try copy.sync()
                copy.close()
                logger.error("catalog journal damaged before its end; kept a copy, sessions after the damage are lost", metadata: [
                    "copy": "\(aside)", "validBytes": "\(replay.validBytes)", "fileBytes": "\(length)",
                ])
            } else {
                logger.info("catalog journal ends in a torn record (an interrupted append); dropping it", metadata: [
                    "bytes": "\(length - replay.validBytes)",
                ])
            }
            try file.truncate(to: replay.validBytes)
            try file.sync()
        }
        return (CatalogJournal(storage: storage, logger: logger, file: file, size: replay.validBytes), replay.snapshot)
    }

    /// Appends entries; with `sync`, returns once they are durable. On failure the file is cut
    /// back to where it was, so it never holds a change the caller did not make (a retry would
    /// otherwise append it twice, and replay would stop at the second copy); if even that fails,
    /// the journal refuses every later append until a restart replays it.
    func append(_ entries: [CatalogEntry], sync: Bool) throws(StorageError) {
        if let broken { throw broken }
        var writer = ByteWriter()
        for entry in entries { Self.encodeRecord(entry, into: &writer) }
        do {
            try file.write(writer.bytes, at: size)
            if sync { try file.sync() }
        } catch {
            do {
                try file.truncate(to: size)
                try file.sync()
            } catch {
                broken = error
                logger.error("catalog journal cannot be cut back after a failed append; session changes are refused until kvtierd restarts",
                             metadata: ["error": "\(error)"])
            }
            throw error
        }
        size += writer.count
    }

    /// Replaces the journal with one record per model and session (compaction), atomically.
    func rewrite(_ snapshot: CatalogSnapshot) throws(StorageError) {
        var writer = ByteWriter()
        writer.raw(Self.header())
        for model in snapshot.models.values.sorted(by: { $0.id < $1.id }) { Self.encodeRecord(.model(model), into: &writer) }
        for session in snapshot.sessions.values { Self.encodeRecord(.session(session), into: &writer) }
        let temporary = try storage.open(Self.temporaryName, .readWriteCreate)
        do {
            try temporary.truncate(to: 0)
            try temporary.write(writer.bytes, at: 0)
            try temporary.sync()
            try storage.rename(Self.temporaryName, Self.fileName)
        } catch {
            temporary.close()
            throw error
        }
        // Renamed: appends go to the new file from now on, whatever happens next.
        file.close()
        file = temporary
        size = writer.count
        do { try storage.syncDirectory("") } catch {
            logger.warning("catalog journal rewritten but its directory not synced; a power loss may bring back the longer old file, which replays to the same state",
                           metadata: ["error": "\(error)"])
        }
    }

    // MARK: encoding

    static func header() -> [UInt8] {
        var w = ByteWriter(capacity: headerBytes)
        w.u64(magic)
        w.u32(version)
        w.u32(CRC32C.checksum(w.bytes))
        return w.bytes
    }

    /// `u32 bodyBytes`, `u32 crc32c(body)`, body: `u8 kind`, then the kind's fields.
    static func encodeRecord(_ entry: CatalogEntry, into w: inout ByteWriter) {
        let start = w.count
        w.u32(0)
        w.u32(0)
        func id(_ id: SessionID) {
            w.u32(id.tenant.rawValue)
            string(id.name)
        }
        func string(_ s: String) {
            w.u16(UInt16(s.utf8.count))
            w.raw(s.utf8)
        }
        func tokens(_ t: [UInt32]) {
            w.u32(UInt32(t.count))
            for token in t { w.u32(token) }
        }
        switch entry {
        case .model(let m):
            w.u8(CatalogEntry.Kind.model.rawValue)
            w.u64(m.id)
            string(m.name)
            w.u16(UInt16(m.layers))
            w.u16(UInt16(m.kvHeads))
            w.u16(UInt16(m.headDim))
            w.u8(m.elementType.rawValue)
            w.u32(UInt32(m.pageTokens))
            w.u32(m.ropeTheta.bitPattern)
            // Only when the model chose one: the record of a model without is as it always was,
            // so a journal that never saw a codec stays readable by earlier daemons.
            if let codec = m.diskCodec { string(codec.name) }
        case .session(let s):
            w.u8(CatalogEntry.Kind.session.rawValue)
            id(s.id)
            w.u64(s.modelID)
            w.bool(s.pinned)
            w.u32(s.ttlSeconds)
            w.u64(s.lastUsedMicros)
            tokens(s.tokens)
        case .extend(let s, let keep, let appended, let lastUsed):
            w.u8(CatalogEntry.Kind.extend.rawValue)
            id(s)
            w.u32(UInt32(keep))
            w.u64(lastUsed)
            tokens(appended)
        case .settings(let s, let pinned, let ttl, let lastUsed):
            w.u8(CatalogEntry.Kind.settings.rawValue)
            id(s)
            w.bool(pinned)
            w.u32(ttl)
            w.u64(lastUsed)
        case .delete(let s):
            w.u8(CatalogEntry.Kind.delete.rawValue)
            id(s)
        }
        let body = w.count - start - 8
        w.patchU32(UInt32(body), at: start)
        let crc = w.bytes.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[(start + 8)...])) }
        w.patchU32(crc, at: start + 4)
    }

    struct Replay {
        var headerValid: Bool
        var snapshot = CatalogSnapshot()
        /// Bytes of header and records that parsed and applied.
        var validBytes = 0
        /// The first bad record is followed by more bytes than it claims: damage, not a torn append.
        var corruptBeforeEnd = false
    }

    static func replay(_ bytes: [UInt8]) -> Replay {
        bytes.withUnsafeBytes { raw in
            var reader = ByteReader(raw)
            guard raw.count >= headerBytes, (try? reader.u64()) == magic, (try? reader.u32()) == version,
                  (try? reader.u32()) == CRC32C.checksum(UnsafeRawBufferPointer(rebasing: raw[0..<12])) else {
                return Replay(headerValid: false)
            }
            var result = Replay(headerValid: true, validBytes: headerBytes)
            var at = headerBytes
            while at < raw.count {
                guard raw.count - at >= 8 else { break }
                var lengths = ByteReader(raw, offset: at)
                let body = Int((try? lengths.u32()) ?? 0)
                let crc = (try? lengths.u32()) ?? 0
                guard body >= 1, body <= maxRecordBytes, body <= raw.count - at - 8 else {
                    // Past the end: a torn append, unless the length field itself is damaged.
                    result.corruptBeforeEnd = body > maxRecordBytes || body == 0 && raw[at...].contains { $0 != 0 }
                    break
                }
                let bodyBytes = UnsafeRawBufferPointer(rebasing: raw[(at + 8)..<(at + 8 + body)])
                guard CRC32C.checksum(bodyBytes) == crc, let entry = decodeBody(bodyBytes),
                      result.snapshot.apply(entry) else {
                    result.corruptBeforeEnd = at + 8 + body < raw.count
                    break
                }
                at += 8 + body
                result.validBytes = at
            }
            return result
        }
    }

    static func decodeBody(_ body: UnsafeRawBufferPointer) -> CatalogEntry? {
        var r = ByteReader(body)
        func string() throws -> String {
            let n = Int(try r.u16())
            guard let s = String(validating: try r.bytes(n), as: UTF8.self) else { throw ByteReader.OutOfBounds(offset: r.offset, wanted: n, available: 0) }
            return s
        }
        func id() throws -> SessionID {
            let tenant = TenantID(try r.u32())
            return SessionID(tenant: tenant, name: try string())
        }
        func tokens() throws -> [UInt32] {
            let count = Int(try r.u32())
            guard count <= maxTokensPerRecord, count * 4 <= r.remaining else { throw ByteReader.OutOfBounds(offset: r.offset, wanted: count * 4, available: r.remaining) }
            var out = [UInt32]()
            out.reserveCapacity(count)
            for _ in 0..<count { out.append(try r.u32()) }
            return out
        }
        func bool() throws -> Bool? {
            switch try r.u8() {
            case 0: false
            case 1: true
            default: nil
            }
        }
        do {
            let entry: CatalogEntry
            switch CatalogEntry.Kind(rawValue: try r.u8()) {
            case .model:
                let modelID = try r.u64()
                let name = try string()
                let layers = Int(try r.u16()), kvHeads = Int(try r.u16()), headDim = Int(try r.u16())
                guard let element = ElementType(rawValue: try r.u8()) else { return nil }
                let pageTokens = Int(try r.u32())
                let ropeTheta = Float(bitPattern: try r.u32())
                // The optional trailing field: the model's disk codec, by canonical name.
                var codec: Codec? = nil
                if r.remaining > 0 {
                    guard let parsed = try? Codec(name: try string()) else { return nil }
                    codec = parsed
                }
                entry = .model(ModelSpec(id: modelID, name: name, layers: layers, kvHeads: kvHeads, headDim: headDim,
                                         elementType: element, pageTokens: pageTokens, ropeTheta: ropeTheta, diskCodec: codec))
            case .session:
                let sid = try id()
                let modelID = try r.u64()
                guard let pinned = try bool() else { return nil }
                let ttl = try r.u32()
                let lastUsed = try r.u64()
                entry = .session(Session(tenant: sid.tenant, name: sid.name, modelID: modelID, tokens: try tokens(),
                                         pinned: pinned, ttlSeconds: ttl, lastUsedMicros: lastUsed))
            case .extend:
                let sid = try id()
                let keep = Int(try r.u32())
                let lastUsed = try r.u64()
                entry = .extend(sid, keep: keep, appended: try tokens(), lastUsedMicros: lastUsed)
            case .settings:
                let sid = try id()
                guard let pinned = try bool() else { return nil }
                let ttl = try r.u32()
                entry = .settings(sid, pinned: pinned, ttlSeconds: ttl, lastUsedMicros: try r.u64())
            case .delete:
                entry = .delete(try id())
            case nil:
                return nil
            }
            return r.remaining == 0 ? entry : nil
        } catch {
            return nil
        }
    }
}

extension ByteWriter {
    mutating func bool(_ v: Bool) { u8(v ? 1 : 0) }
}
