import KVTierCore

/// `REGISTER_MODEL` request: `string name`, `u16 layers`, `u16 kvHeads`, `u16 headDim`,
/// `u8 elementType`, `u8 zero`, `u16 pageTokens` (0: the daemon's default), `f32 ropeTheta`,
/// then optionally `string diskCodec` (absent or empty: the daemon's configured disk codec).
/// Shape limits (`Limits.maxLayers`…) and codec names are the daemon's `invalidArgument`, not a
/// parse error: this module does not know the codecs.
public struct RegisterModel: WireBody {
    public var name: String
    public var layers: UInt16
    public var kvHeads: UInt16
    public var headDim: UInt16
    public var elementType: ElementType
    public var pageTokens: UInt16
    public var ropeTheta: Float
    /// The codec this model's pages are written to disk with (a `Codec(name:)` name); nil (the
    /// field absent) or empty: the daemon's configured one. Nil is not sent at all, so such a
    /// request is byte for byte what clients sent before the field existed, and fingerprints
    /// the same; an empty name is kept apart from nil only so that every body re-encodes to the
    /// bytes it was decoded from.
    public var diskCodec: String?

    public init(name: String, layers: UInt16, kvHeads: UInt16, headDim: UInt16, elementType: ElementType,
                pageTokens: UInt16 = 0, ropeTheta: Float, diskCodec: String? = nil) {
        self.name = name
        self.layers = layers
        self.kvHeads = kvHeads
        self.headDim = headDim
        self.elementType = elementType
        self.pageTokens = pageTokens
        self.ropeTheta = ropeTheta
        self.diskCodec = diskCodec
    }

    /// The request body: the fixed fields, then `string diskCodec` unless it is nil.
    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        try encodeFixed(into: &writer, reserved: 0)
        if let diskCodec { try writer.wireString(diskCodec, field: "diskCodec") }
    }

    /// As a `MODELS` entry: the reserved byte after `elementType` says whether `string diskCodec`
    /// follows `ropeTheta` (1) or not (0), since in a list the entry's end is not the body's.
    func encodeListed(into writer: inout ByteWriter) throws(ProtocolError) {
        try encodeFixed(into: &writer, reserved: diskCodec == nil ? 0 : Self.listedCodecFollows)
        if let diskCodec { try writer.wireString(diskCodec, field: "diskCodec") }
    }

    /// The codec name that counts: nil when none was named (absent or empty).
    public var namedDiskCodec: String? {
        guard let diskCodec, !diskCodec.isEmpty else { return nil }
        return diskCodec
    }

    private func encodeFixed(into writer: inout ByteWriter, reserved: UInt8) throws(ProtocolError) {
        try writer.wireString(name, field: "name")
        writer.u16(layers)
        writer.u16(kvHeads)
        writer.u16(headDim)
        writer.u8(elementType.rawValue)
        writer.u8(reserved)
        writer.u16(pageTokens)
        writer.f32(ropeTheta)
    }

    /// The value of a `MODELS` entry's reserved byte when a `string diskCodec` follows.
    static let listedCodecFollows: UInt8 = 1

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "REGISTER_MODEL request")
        let reserved: UInt8
        (self, reserved) = try Self.decodeFixed(from: &reader)
        guard reserved == 0 else { throw .malformed("REGISTER_MODEL request: the byte after elementType is \(reserved), must be 0") }
        // The optional trailing field: present exactly when bytes remain.
        diskCodec = reader.remaining > 0 ? try reader.string("diskCodec") : nil
        try reader.finish()
    }

    /// A `MODELS` entry's registration (see `encodeListed`).
    init(listedFrom reader: inout BodyReader) throws(ProtocolError) {
        let reserved: UInt8
        (self, reserved) = try Self.decodeFixed(from: &reader)
        switch reserved {
        case 0: diskCodec = nil
        case Self.listedCodecFollows: diskCodec = try reader.string("diskCodec")
        default:
            throw .malformed("MODELS reply: the byte after elementType is \(reserved), must be 0 (no disk codec follows) or 1 (one follows)")
        }
    }

    /// Reads the fields every form shares (no disk codec yet), and the byte after `elementType`.
    private static func decodeFixed(from reader: inout BodyReader) throws(ProtocolError) -> (RegisterModel, UInt8) {
        let name = try reader.string("name")
        let layers = try reader.u16(), kvHeads = try reader.u16(), headDim = try reader.u16()
        let rawType = try reader.u8()
        guard let elementType = ElementType(rawValue: rawType) else {
            throw .malformed("\(reader.context): elementType \(rawType) is neither 1 (float16) nor 2 (bfloat16)")
        }
        let reserved = try reader.u8()
        let pageTokens = try reader.u16()
        let ropeTheta = try reader.f32()
        return (RegisterModel(name: name, layers: layers, kvHeads: kvHeads, headDim: headDim, elementType: elementType,
                              pageTokens: pageTokens, ropeTheta: ropeTheta), reserved)
    }

    /// Bit-exact equality (so a NaN `ropeTheta` equals itself, as the model id sees it).
    public static func == (a: RegisterModel, b: RegisterModel) -> Bool {
        a.name == b.name && a.layers == b.layers && a.kvHeads == b.kvHeads && a.headDim == b.headDim
            && a.elementType == b.elementType && a.pageTokens == b.pageTokens
            && a.ropeTheta.bitPattern == b.ropeTheta.bitPattern && a.diskCodec == b.diskCodec
    }

    /// The id the daemon answers once `pageTokens` in force is known. `diskCodec` is hashed as
    /// given (when named): the daemon first replaces it by the codec's canonical name.
    public func modelID(pageTokensInForce: UInt16) throws(ProtocolError) -> UInt64 {
        try ModelFingerprint.modelID(name: name, layers: layers, kvHeads: kvHeads, headDim: headDim,
                                     elementType: elementType, pageTokens: pageTokensInForce, ropeTheta: ropeTheta,
                                     diskCodec: namedDiskCodec)
    }
}

/// `REGISTER_MODEL` reply: `u64 modelID`, `u16 pageTokens` (in force).
public struct RegisterModelReply: WireBody {
    public var modelID: UInt64
    public var pageTokens: UInt16

    public init(modelID: UInt64, pageTokens: UInt16) {
        self.modelID = modelID
        self.pageTokens = pageTokens
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        writer.u64(modelID)
        writer.u16(pageTokens)
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "REGISTER_MODEL reply")
        modelID = try reader.u64()
        pageTokens = try reader.u16()
        try reader.finish()
    }
}

/// One registered model of a `MODELS` reply: `u64 modelID`, then its registration as a
/// `REGISTER_MODEL` request body (with the page size in force), except that the reserved byte
/// after `elementType` is 1 when the model has a disk codec, whose `string diskCodec` then
/// follows `ropeTheta` (`RegisterModel.encodeListed`).
public struct ModelEntry: Sendable, Equatable {
    public var modelID: UInt64
    public var registration: RegisterModel

    public init(modelID: UInt64, registration: RegisterModel) {
        self.modelID = modelID
        self.registration = registration
    }

    /// The fewest bytes one entry takes (an empty name, no disk codec).
    static let minimumBytes = 8 + 2 + 2 + 2 + 2 + 1 + 1 + 2 + 4
}

extension RegisterModel {
    /// The model's shape as the store and the clients name it: the one conversion from the
    /// wire's 16-bit fields.
    public var shape: ModelShape {
        ModelShape(layers: Int(layers), kvHeads: Int(kvHeads), headDim: Int(headDim), elementType: elementType)
    }

    /// A registration of `shape`: the one conversion to the wire's 16-bit fields. Throws
    /// `malformed` naming the field when a value does not fit 16 bits (the daemon checks the
    /// shape's limits, `ModelShape.limitViolation`).
    public init(name: String, shape: ModelShape, pageTokens: Int, ropeTheta: Float, diskCodec: String?) throws(ProtocolError) {
        func narrow(_ value: Int, _ field: String) throws(ProtocolError) -> UInt16 {
            guard let narrow = UInt16(exactly: value) else { throw .malformed("REGISTER_MODEL: \(field) \(value) does not fit 16 bits") }
            return narrow
        }
        self.init(name: name, layers: try narrow(shape.layers, "layers"), kvHeads: try narrow(shape.kvHeads, "kvHeads"),
                  headDim: try narrow(shape.headDim, "headDim"), elementType: shape.elementType,
                  pageTokens: try narrow(pageTokens, "pageTokens"), ropeTheta: ropeTheta, diskCodec: diskCodec)
    }
}
