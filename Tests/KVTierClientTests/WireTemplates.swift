import KVTierCore
import KVTierProtocol

/// One integer (or float) field of a frame as docs/protocol.md lays it out: where it sits in the
/// frame, and how wide it is. Counts and string lengths are fields too.
struct WireField: Sendable {
    var name: String
    var offset: Int
    var width: Int
    var isFloat = false
}

/// Builds a request body field by field, remembering where each integer field lies, so a test
/// can put any value into any field of a frame the Swift client would never build.
struct FieldRecorder {
    private(set) var bytes: [UInt8] = []
    private(set) var fields: [WireField] = []

    mutating func int(_ name: String, _ value: UInt64, width: Int) {
        fields.append(WireField(name: name, offset: bytes.count, width: width))
        for i in 0..<width { bytes.append(UInt8(truncatingIfNeeded: value >> (8 * UInt64(i)))) }
    }
    mutating func u8(_ name: String, _ value: UInt8) { int(name, UInt64(value), width: 1) }
    mutating func u16(_ name: String, _ value: UInt16) { int(name, UInt64(value), width: 2) }
    mutating func u32(_ name: String, _ value: UInt32) { int(name, UInt64(value), width: 4) }
    mutating func u64(_ name: String, _ value: UInt64) { int(name, value, width: 8) }
    mutating func f32(_ name: String, _ value: Float) {
        int(name, UInt64(value.bitPattern), width: 4)
        fields[fields.count - 1].isFloat = true
    }
    mutating func string(_ name: String, _ value: String) {
        u16("\(name).length", UInt16(value.utf8.count))
        bytes += value.utf8
    }
    /// The count, and the first token as a field of its own (the rest are alike).
    mutating func tokens(_ name: String, _ tokens: [UInt32]) {
        u32("\(name).count", UInt32(tokens.count))
        for (index, token) in tokens.enumerated() {
            if index == 0 { u32("\(name)[0]", token) } else { int("", UInt64(token), width: 4); fields.removeLast() }
        }
    }
    mutating func extents(_ name: String, _ extents: [WireExtent]) {
        u32("\(name).count", UInt32(extents.count))
        for (index, extent) in extents.enumerated() {
            u64("\(name)[\(index)].offset", extent.offset)
            u64("\(name)[\(index)].bytes", extent.bytes)
            u32("\(name)[\(index)].tokens", extent.tokens)
        }
    }
    mutating func raw(_ data: [UInt8]) { bytes += data }

    /// Header (its five fields recorded too) and body.
    func frame(opcode: Opcode) -> (bytes: [UInt8], fields: [WireField]) {
        var header = FieldRecorder()
        header.u32("header.bodyBytes", UInt32(bytes.count))
        header.u16("header.opcode", opcode.rawValue)
        header.u16("header.flags", 0)
        header.u32("header.requestID", 7)
        header.u32("header.status", 0)
        let shifted = fields.map { WireField(name: $0.name, offset: $0.offset + 16, width: $0.width, isFloat: $0.isFloat) }
        return (header.bytes + bytes, header.fields + shifted)
    }
}

/// What a fuzzed request may refer to on its connection: the model, and staging extents of an
/// `ALLOC` sent just before it (so `PUT` and `RELEASE` reach the checks behind the decoder).
struct WireState {
    var modelID: UInt64
    var leaseID: UInt64
    var staging: [WireExtent]
}

/// A valid request of one opcode, as a template for boundary values, truncations and noise.
struct RequestTemplate: Sendable {
    var name: String
    var opcode: Opcode
    /// Sent as the connection's first frame, instead of after a `HELLO`.
    var isHello = false
    var build: @Sendable (WireState) -> FieldRecorder

    /// Every request of docs/protocol.md, each with fields that reach the daemon's semantics.
    static func all(pageBytes: Int) -> [RequestTemplate] {
        let tokens = (0..<32).map { UInt32(90_000 + $0) }
        let session = "fuzz-session"
        return [
            RequestTemplate(name: "HELLO", opcode: .hello, isHello: true) { _ in
                var r = FieldRecorder()
                r.u16("minVersion", ProtocolVersion.current); r.u16("maxVersion", ProtocolVersion.current); r.u32("capabilities", 0); r.string("clientName", "fuzz")
                return r
            },
            RequestTemplate(name: "PING", opcode: .ping) { _ in FieldRecorder() },
            RequestTemplate(name: "REGISTER_MODEL", opcode: .registerModel) { _ in
                var r = FieldRecorder()
                r.string("name", "hostile-fuzz-model")
                r.u16("layers", 1); r.u16("kvHeads", 1); r.u16("headDim", 8); r.u8("elementType", 1); r.u8("zero", 0)
                r.u16("pageTokens", 16); r.f32("ropeTheta", 10_000)
                return r
            },
            RequestTemplate(name: "LOOKUP", opcode: .lookup) { s in
                var r = FieldRecorder()
                r.u64("modelID", s.modelID); r.tokens("tokens", tokens)
                return r
            },
            RequestTemplate(name: "PUT extents", opcode: .put) { s in
                var r = FieldRecorder()
                r.u64("modelID", s.modelID); r.string("session", ""); r.u8("flags", 0); r.tokens("tokens", tokens)
                r.u32("dataStart", 0); r.extents("extents", s.staging.map { WireExtent(offset: $0.offset, bytes: $0.bytes, tokens: 16) })
                return r
            },
            RequestTemplate(name: "PUT inline session", opcode: .put) { s in
                var r = FieldRecorder()
                r.u64("modelID", s.modelID); r.string("session", session); r.u8("flags", 3); r.tokens("tokens", Array(tokens[0..<16]))
                r.u32("dataStart", 0); r.u64("bytes.length", UInt64(pageBytes)); r.raw((0..<pageBytes).map { UInt8(truncatingIfNeeded: $0 &* 7) })
                return r
            },
            RequestTemplate(name: "GET", opcode: .get) { s in
                var r = FieldRecorder()
                r.u64("modelID", s.modelID); r.tokens("tokens", tokens); r.u32("maxTokens", 0); r.u8("flags", 2)
                return r
            },
            RequestTemplate(name: "RELEASE", opcode: .release) { s in
                var r = FieldRecorder()
                r.u64("leaseID", s.leaseID)
                return r
            },
            RequestTemplate(name: "ALLOC", opcode: .alloc) { _ in
                var r = FieldRecorder()
                r.u32("count", 2); r.u64("bytes[0]", UInt64(pageBytes)); r.u64("bytes[1]", UInt64(pageBytes))
                return r
            },
            RequestTemplate(name: "SESSION_LIST", opcode: .sessionList) { _ in
                var r = FieldRecorder(); r.u32("offset", 0); r.u32("limit", 16); return r
            },
            RequestTemplate(name: "SESSION_INFO", opcode: .sessionInfo) { _ in
                var r = FieldRecorder(); r.string("name", session); return r
            },
            RequestTemplate(name: "SESSION_PIN", opcode: .sessionPin) { _ in
                var r = FieldRecorder(); r.string("name", session); r.u8("pinned", 1); return r
            },
            RequestTemplate(name: "SESSION_TTL", opcode: .sessionTTL) { _ in
                var r = FieldRecorder(); r.string("name", session); r.u32("seconds", 3600); return r
            },
            RequestTemplate(name: "SESSION_FORK", opcode: .sessionFork) { _ in
                var r = FieldRecorder(); r.string("from", session); r.string("to", "fuzz-fork"); return r
            },
            RequestTemplate(name: "SESSION_DELETE", opcode: .sessionDelete) { _ in
                var r = FieldRecorder(); r.string("name", "fuzz-fork"); return r
            },
            RequestTemplate(name: "SESSION_TOKENS", opcode: .sessionTokens) { _ in
                var r = FieldRecorder(); r.string("name", session); return r
            },
            RequestTemplate(name: "ATTENTION", opcode: .attention) { s in
                var r = FieldRecorder()
                r.u64("modelID", s.modelID); r.tokens("tokens", tokens); r.u32("masses.count", 2)
                r.f32("masses[0]", 0.5); r.f32("masses[1]", 0.25)
                return r
            },
            RequestTemplate(name: "STATUS", opcode: .status) { _ in FieldRecorder() },
            RequestTemplate(name: "PAGES", opcode: .pages) { s in
                var r = FieldRecorder(); r.u64("modelID", s.modelID); r.u32("offset", 0); r.u32("limit", 16); return r
            },
            RequestTemplate(name: "EVICT", opcode: .evict) { s in
                var r = FieldRecorder()
                r.u64("modelID", s.modelID); r.tokens("tokens", tokens); r.u8("flags", 0); r.string("session", "")
                return r
            },
            RequestTemplate(name: "MODELS", opcode: .models) { _ in
                var r = FieldRecorder(); r.u32("offset", 0); r.u32("limit", 16); return r
            },
            RequestTemplate(name: "VRAM_POOL", opcode: .vramPool) { _ in
                var r = FieldRecorder()
                r.string("deviceUUID", "GPU-fuzz"); r.u32("slots", 4); r.u64("slotBytes", UInt64(pageBytes))
                r.u16("handle.length", 3); r.raw([1, 2, 3])
                return r
            },
            RequestTemplate(name: "VRAM_PLACE", opcode: .vramPlace) { s in
                var r = FieldRecorder(); r.u64("modelID", s.modelID); r.u32("poolID", 1); r.tokens("tokens", tokens); return r
            },
            RequestTemplate(name: "VRAM_COMMIT", opcode: .vramCommit) { _ in
                var r = FieldRecorder(); r.u64("leaseID", 1 << 62); return r
            },
            RequestTemplate(name: "VRAM_LEASE", opcode: .vramLease) { s in
                var r = FieldRecorder(); r.u64("modelID", s.modelID); r.tokens("tokens", tokens); return r
            },
            RequestTemplate(name: "VRAM_DROP", opcode: .vramDrop) { _ in
                var r = FieldRecorder(); r.u32("poolID", 1); return r
            },
        ]
    }
}

/// The boundary values every integer field gets (cut to its width), and the float specials a
/// float field gets besides.
enum BoundaryValues {
    static let integers: [UInt64] = [
        0, 1, (1 << 31) - 1, 1 << 31, (1 << 31) + 1, 1 << 32, UInt64(Int64.max), 1 << 63, (1 << 63) + 1, .max,
    ]
    static let floats: [Float] = [
        .nan, -.nan, .signalingNaN, .infinity, -.infinity, -0.0, .greatestFiniteMagnitude, -.greatestFiniteMagnitude,
        .leastNonzeroMagnitude, -1,
    ]

    /// The distinct values `field` takes.
    static func values(for field: WireField) -> [UInt64] {
        let mask: UInt64 = field.width == 8 ? .max : (1 << (8 * UInt64(field.width))) - 1
        var seen = Set<UInt64>()
        var values: [UInt64] = []
        for value in integers.map({ $0 & mask }) + (field.isFloat ? floats.map { UInt64($0.bitPattern) } : []) where seen.insert(value).inserted {
            values.append(value)
        }
        return values
    }

    /// `frame` with `value` written little-endian into `field`.
    static func substitute(_ value: UInt64, into field: WireField, of frame: [UInt8]) -> [UInt8] {
        var bytes = frame
        for i in 0..<field.width { bytes[field.offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
        return bytes
    }
}
