import KVTierCore

/// `ATTENTION` request: `u64 modelID`, `tokens`, `u32 count`, `count × f32` attention mass per
/// page. The empty reply needs no type. The page count is bounded by `maxTokensPerRequest`
/// (a page holds at least one token); matching it to the tokens is the daemon's check.
public struct Attention: WireBody {
    public var modelID: UInt64
    public var tokens: [UInt32]
    public var pageMass: [Float]

    public init(modelID: UInt64, tokens: [UInt32], pageMass: [Float]) {
        self.modelID = modelID
        self.tokens = tokens
        self.pageMass = pageMass
    }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        writer.u64(modelID)
        try writer.wireTokens(tokens, field: "tokens")
        guard pageMass.count <= ProtocolLimits.maxTokensPerRequest else {
            throw .tooLarge(what: "ATTENTION request page masses (entries)", size: UInt64(pageMass.count),
                            limit: UInt64(ProtocolLimits.maxTokensPerRequest))
        }
        writer.u32(UInt32(pageMass.count))
        for mass in pageMass { writer.f32(mass) }
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "ATTENTION request")
        modelID = try reader.u64()
        tokens = try reader.tokens("tokens")
        let count = try reader.count("page masses", limit: ProtocolLimits.maxTokensPerRequest, elementBytes: 4)
        pageMass = try reader.u32Array(count).map { Float(bitPattern: $0) }
        try reader.finish()
    }

    /// Bit-exact equality, so NaN masses compare equal to themselves after a round trip.
    public static func == (a: Attention, b: Attention) -> Bool {
        a.modelID == b.modelID && a.tokens == b.tokens && a.pageMass.map(\.bitPattern) == b.pageMass.map(\.bitPattern)
    }
}

/// One counter or gauge of `STATUS`.
public struct StatusCounter: Sendable, Hashable {
    public var name: String
    public var value: UInt64

    public init(name: String, value: UInt64) {
        self.name = name
        self.value = value
    }

    /// The fewest bytes one entry takes (an empty name).
    static let minimumBytes = 2 + 8
}

/// `STATUS` reply: `u32 count`, then `count × (string name, u64 value)`. The request is empty.
/// No limit of its own: the count is bounded by `maxControlBody`.
public struct StatusReply: WireBody {
    public var counters: [StatusCounter]

    public init(counters: [StatusCounter]) { self.counters = counters }

    public func encode(into writer: inout ByteWriter) throws(ProtocolError) {
        writer.u32(UInt32(clamping: counters.count))
        for counter in counters {
            try writer.wireString(counter.name, field: "counter name")
            writer.u64(counter.value)
        }
    }

    public init(decoding body: UnsafeRawBufferPointer) throws(ProtocolError) {
        var reader = BodyReader(body, context: "STATUS reply")
        let count = try reader.count("counters", limit: ProtocolLimits.maxControlBody / StatusCounter.minimumBytes,
                                     elementBytes: StatusCounter.minimumBytes)
        var counters: [StatusCounter] = []
        counters.reserveCapacity(count)
        for _ in 0..<count {
            let name = try reader.string("counter name")
            counters.append(StatusCounter(name: name, value: try reader.u64()))
        }
        self.counters = counters
        try reader.finish()
    }
}
