import KVTierCore

/// `REGISTER_MODEL` request: `string name`, `u16 layers`, `u16 kvHeads`, `u16 headDim`,
/// `u8 elementType`, `u8 zero`, `u16 pageTokens` (0: the daemon's default), `f32 ropeTheta`.
/// Shape limits (`Limits.maxLayers`…) are the daemon's `invalidArgument`, not a parse error.
public struct RegisterModel: WireBody {
    public var name: String
    public var layers: UInt16
    public var kvHeads: UInt16
    public var headDim: UInt16
    public var elementType: ElementType
    public var pageTokens: UInt16
    public var ropeTheta: Float

    public init(name: String, layers: UInt16, kvHeads: UInt16, headDim: UInt16, elementType: ElementType,
                pageTokens: UInt16 = 0, ropeTheta: Float) {
        self.name = name
        self.layers = layers
        self.kvHeads = kvHeads
        self.headDim = headDim
        self.elementType = elementType
        self.pageTokens = pageTokens
        self.ropeTheta = ropeTheta
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        try writer.wireString(name, field: "name")
        writer.u16(layers)
        writer.u16(kvHeads)
        writer.u16(headDim)
        writer.u8(elementType.rawValue)
        writer.u8(0)
        writer.u16(pageTokens)
        writer.f32(ropeTheta)
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "REGISTER_MODEL request")
        try self.init(from: &reader)
        try reader.finish()
    }

    init(from reader: inout BodyReader) throws(ProtocolError) {
        name = try reader.string("name")
        layers = try reader.u16()
        kvHeads = try reader.u16()
        headDim = try reader.u16()
        let rawType = try reader.u8()
        guard let elementType = ElementType(rawValue: rawType) else {
            throw .malformed("REGISTER_MODEL request: elementType \(rawType) is neither 1 (float16) nor 2 (bfloat16)")
        }
        self.elementType = elementType
        let zero = try reader.u8()
        guard zero == 0 else { throw .malformed("REGISTER_MODEL request: the byte after elementType is \(zero), must be 0") }
        pageTokens = try reader.u16()
        ropeTheta = try reader.f32()
    }

    /// Bit-exact equality (so a NaN `ropeTheta` equals itself, as the model id sees it).
    public static func == (a: RegisterModel, b: RegisterModel) -> Bool {
        a.name == b.name && a.layers == b.layers && a.kvHeads == b.kvHeads && a.headDim == b.headDim
            && a.elementType == b.elementType && a.pageTokens == b.pageTokens
            && a.ropeTheta.bitPattern == b.ropeTheta.bitPattern
    }

    /// The id the daemon answers once `pageTokens` in force is known.
    public func modelID(pageTokensInForce: UInt16) throws(ProtocolError) -> UInt64 {
        try ModelFingerprint.modelID(name: name, layers: layers, kvHeads: kvHeads, headDim: headDim,
                                     elementType: elementType, pageTokens: pageTokensInForce, ropeTheta: ropeTheta)
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
/// `REGISTER_MODEL` request body (with the page size in force).
public struct ModelEntry: Sendable, Equatable {
    public var modelID: UInt64
    public var registration: RegisterModel

    public init(modelID: UInt64, registration: RegisterModel) {
        self.modelID = modelID
        self.registration = registration
    }

    /// The fewest bytes one entry takes (an empty name).
    static let minimumBytes = 8 + 2 + 2 + 2 + 2 + 1 + 1 + 2 + 4
}
