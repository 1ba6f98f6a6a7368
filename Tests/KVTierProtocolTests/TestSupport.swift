#if canImport(Glibc)
@preconcurrency import Glibc
#endif
import KVTierCore
import Testing
@testable import KVTierProtocol

/// A seed from `KVTIER_TEST_SEED` when set, otherwise random; printed so a failure replays.
func testSeed(_ name: String) -> UInt64 {
    let seed: UInt64
    if let text = getenv("KVTIER_TEST_SEED").map({ String(cString: $0) }), let parsed = UInt64(text) {
        seed = parsed
    } else {
        seed = UInt64.random(in: 0...UInt64.max)
    }
    print("\(name): seed \(seed) (rerun with KVTIER_TEST_SEED=\(seed))")
    return seed
}

/// Random but valid messages of every type, from a seeded generator. `maxList` bounds list
/// lengths (kept small so thousands of round trips stay fast).
struct MessageGenerator {
    var random: SplitMix64
    var maxList: Int

    init(seed: UInt64, maxList: Int = 40) {
        random = SplitMix64(seed: seed)
        self.maxList = maxList
    }

    mutating func int(_ range: ClosedRange<Int>) -> Int { Int.random(in: range, using: &random) }
    mutating func u16() -> UInt16 { UInt16(truncatingIfNeeded: random.next()) }
    mutating func u32() -> UInt32 { UInt32(truncatingIfNeeded: random.next()) }
    mutating func u64() -> UInt64 { random.next() }
    mutating func bool() -> Bool { random.next() & 1 == 1 }
    /// Any bit pattern, NaNs included: the protocol carries floats bit-exactly.
    mutating func float() -> Float { Float(bitPattern: u32()) }

    /// Valid UTF-8 of one to four bytes per character, at most `maxBytes` bytes.
    mutating func string(maxBytes: Int = 24) -> String {
        let pool: [Character] = ["a", "Z", "0", "-", " ", "é", "ß", "漢", "字", "🙂", "\u{0}"]
        var result = ""
        let target = int(0...maxBytes)
        while true {
            let next = pool[int(0...pool.count - 1)]
            if result.utf8.count + next.utf8.count > target { break }
            result.append(next)
        }
        return result
    }

    /// Absent (most often, as old clients send), empty, or a name.
    mutating func diskCodec() -> String? {
        switch int(0...3) {
        case 0, 1: nil
        case 2: ""
        default: string()
        }
    }
    mutating func tokens() -> [UInt32] { (0..<int(0...maxList)).map { _ in u32() } }

    mutating func extents(tokensZero: Bool = false) -> [WireExtent] {
        (0..<int(0...maxList)).map { _ in
            WireExtent(offset: UInt64(u32() % 1_000_000) * 4096, bytes: UInt64(u16()) * 4096, tokens: tokensZero ? 0 : u32())
        }
    }

    /// A GET's page list: strictly increasing indices.
    mutating func increasingPages() -> [UInt32] {
        var page: UInt32 = 0
        return (0..<int(0...maxList)).map { _ in
            page += UInt32(int(1...1_000))
            return page - 1
        }
    }

    mutating func pageData() -> PageData {
        if bool() { return .extents(extents()) }
        return .inline((0..<int(0...maxList * 8)).map { _ in UInt8(truncatingIfNeeded: random.next()) })
    }

    mutating func sessionInfo() -> SessionInfo {
        SessionInfo(name: string(), modelID: u64(), tokens: u32(), pinned: bool(), ttlSeconds: u32(),
                    lastUsedMicros: u64(), ramTokens: u32(), diskTokens: u32())
    }

    mutating func request(_ opcode: Opcode) -> Request {
        switch opcode {
        case .hello: .hello(Hello(minVersion: u16(), maxVersion: u16(), capabilities: Capabilities(rawValue: u32()), clientName: string()))
        case .ping: .ping
        case .registerModel:
            .registerModel(RegisterModel(name: string(), layers: u16(), kvHeads: u16(), headDim: u16(),
                                         elementType: bool() ? .float16 : .bfloat16, pageTokens: u16(), ropeTheta: float(),
                                         diskCodec: diskCodec()))
        case .lookup: .lookup(Lookup(modelID: u64(), tokens: tokens()))
        case .put: .put(Put(modelID: u64(), session: string(), durable: bool(), tokens: tokens(), dataStart: u32(), data: pageData()))
        case .get:
            bool() ? .get(Get(modelID: u64(), tokens: tokens(), maxTokens: u32(), inline: bool()))
                : .get(Get(modelID: u64(), tokens: tokens(), inline: bool(), pages: increasingPages()))
        case .release: .release(Release(leaseID: u64()))
        case .alloc: .alloc(Alloc(byteCounts: (0..<int(0...maxList)).map { _ in u64() }))
        case .sessionList: .sessionList(ListPage(offset: u32(), limit: UInt32(int(1...ProtocolLimits.maxListEntries))))
        case .sessionInfo: .sessionInfo(SessionName(string()))
        case .sessionPin: .sessionPin(SessionPin(name: string(), pinned: bool()))
        case .sessionTTL: .sessionTTL(SessionTTL(name: string(), seconds: u32()))
        case .sessionFork: .sessionFork(SessionFork(from: string(), to: string()))
        case .sessionDelete: .sessionDelete(SessionName(string()))
        case .sessionTokens: .sessionTokens(SessionName(string()))
        case .attention: .attention(Attention(modelID: u64(), tokens: tokens(), pageMass: (0..<int(0...maxList)).map { _ in float() }))
        case .querySample:
            { (layers: UInt16, heads: UInt16, dim: UInt16, count: UInt16) in
                .querySample(QuerySample(modelID: u64(), layers: layers, queryHeads: heads, headDim: dim, count: count,
                                         elements: (0..<(Int(layers) * Int(count) * Int(heads) * Int(dim))).map { _ in u16() }))
            }(UInt16(int(0...4)), UInt16(int(1...4)), UInt16(int(1...16)), UInt16(int(1...QuerySample.maxQueries)))
        case .status: .status
        case .pages: .pages(Pages(modelID: u64(), offset: u32(), limit: UInt32(int(1...Pages.maxPagesPerReply))))
        case .evict: .evict(Evict(modelID: u64(), tokens: tokens(), deleteFromDisk: bool(), everyPage: bool(), session: string()))
        case .models: .models(ListPage(offset: u32(), limit: UInt32(int(1...ProtocolLimits.maxListEntries))))
        case .codecs: .codecs(ListPage(offset: u32(), limit: UInt32(int(1...ProtocolLimits.maxListEntries))))
        case .vramPool:
            .vramPool(VramPool(deviceUUID: "GPU-" + string(maxBytes: 60), slots: UInt32(int(1...ProtocolLimits.maxVramSlots)),
                               slotBytes: UInt64(int(1...Int(ProtocolLimits.maxVramSlotBytes))), handle: bytes(1...ProtocolLimits.maxVramHandleBytes)))
        case .vramPlace: .vramPlace(VramPlace(modelID: u64(), poolID: u32(), tokens: tokens()))
        case .vramCommit: .vramCommit(VramCommit(leaseID: u64()))
        case .vramLease: .vramLease(VramLease(modelID: u64(), tokens: tokens()))
        case .vramDrop: .vramDrop(VramDrop(poolID: u32()))
        }
    }

    /// Random bytes, as many as `count` allows.
    mutating func bytes(_ count: ClosedRange<Int>) -> [UInt8] {
        (0..<int(count)).map { _ in UInt8(truncatingIfNeeded: random.next()) }
    }

    /// A reply to `opcode`: one time in eight an error reply instead.
    mutating func reply(_ opcode: Opcode) -> Reply {
        if int(0...7) == 0 {
            return .error(opcode: opcode.rawValue, ErrorReply(status: UInt32(int(1...20)), message: string(maxBytes: 200)))
        }
        switch opcode {
        case .hello:
            return .hello(HelloReply(version: u16(), tenant: TenantID(u32()), capabilities: Capabilities(rawValue: u32()),
                                     maxControlBody: u32(), maxInlineBody: u32(), maxTokensPerRequest: u32(), arenaBytes: u64()))
        case .ping: return .ping
        case .registerModel: return .registerModel(RegisterModelReply(modelID: u64(), pageTokens: u16()))
        case .lookup: return .lookup(LookupReply(cachedTokens: u32(), ramTokens: u32(), diskTokens: u32(), estimatedLoadMicros: u64()))
        case .put: return .put(PutReply(cachedTokens: u32(), newPages: u32()))
        case .get: return .get(GetReply(tokens: u32(), leaseID: u64(), data: pageData()))
        case .release: return .release
        case .alloc: return .alloc(AllocReply(leaseID: u64(), extents: extents(tokensZero: true)))
        case .sessionList:
            return .sessionList(SessionListReply(total: u32(), sessions: (0..<int(0...maxList / 4)).map { _ in
                SessionEntry(name: string(), modelID: u64(), tokens: u32(), pinned: bool(), ttlSeconds: u32(), lastUsedMicros: u64())
            }))
        case .sessionInfo: return .sessionInfo(sessionInfo())
        case .sessionPin: return .sessionPin
        case .sessionTTL: return .sessionTTL
        case .sessionFork: return .sessionFork(sessionInfo())
        case .sessionDelete: return .sessionDelete
        case .sessionTokens: return .sessionTokens(SessionTokensReply(modelID: u64(), tokens: tokens()))
        case .attention: return .attention
        case .querySample: return .querySample
        case .status:
            return .status(StatusReply(counters: (0..<int(0...maxList)).map { _ in StatusCounter(name: string(), value: u64()) }))
        case .pages:
            return .pages(PagesReply(total: u32(), pages: (0..<int(0...maxList)).map { _ in
                PageInfo(key: PageKey(high: u64(), low: u64()), modelID: u64(), tokens: u32(), tiers: PageInfo.Tiers(rawValue: UInt8(int(0...3))),
                         hold: UInt8(int(0...2)), leases: u16(), heat: float(), codecTag: u32(), storedBytes: u32(), rawBytes: u32(), idleMicros: u64())
            }))
        case .evict: return .evict(EvictReply(evicted: u32(), deleted: u32(), skipped: u32()))
        case .models:
            return .models(ModelsReply(total: u32(), models: (0..<int(0...maxList)).map { _ in
                ModelEntry(modelID: u64(), registration: RegisterModel(name: string(), layers: u16(), kvHeads: u16(), headDim: u16(),
                                                                       elementType: bool() ? .float16 : .bfloat16, pageTokens: u16(), ropeTheta: float(),
                                                                       diskCodec: diskCodec()))
            }))
        case .codecs:
            return .codecs(CodecsReply(total: u32(), choices: (0..<int(0...maxList)).map { _ in
                CodecChoiceInfo(modelID: u64(), phase: CodecChoiceInfo.Phase(rawValue: UInt8(int(0...3)))!, queriesFromKeys: bool(),
                                codecTag: u32(), attentionError: float(), maxAttentionError: float(), lastCheckError: float(),
                                checks: u32(), fallbacks: u32(), sampledTokens: u32(), sampledLayers: u16(), message: string())
            }))
        case .vramPool: return .vramPool(VramPoolReply(poolID: u32()))
        case .vramPlace:
            return .vramPlace(VramPlaceReply(leaseID: u64(), residentTokens: u32(), pages: (0..<int(0...maxList)).map { _ in
                VramPlacedPage(pageIndex: u32(), tokens: u32(), slot: u32())
            }))
        case .vramCommit: return .vramCommit
        case .vramLease:
            return .vramLease(VramLeaseReply(poolID: u32(), deviceUUID: string(maxBytes: 64), slots: u32(), slotBytes: u64(),
                                             handle: bytes(0...ProtocolLimits.maxVramHandleBytes), leaseID: u64(), tokens: u32(),
                                             pages: (0..<int(0...maxList)).map { _ in VramLeasedPage(tokens: u32(), slot: u32()) }))
        case .vramDrop: return .vramDrop(VramDropReply(readers: u32()))
        }
    }
}

extension Reply {
    /// Whether this is a `GET` reply with inline pages (what its decoder must be told).
    var isInlineGet: Bool {
        if case .get(let reply) = self { return reply.data.isInline }
        return false
    }
}

/// Every frame `bytes` holds, fed to a fresh decoder in one piece.
func decodeFrames(_ bytes: [UInt8]) throws(ProtocolError) -> [Frame] {
    var decoder = FrameDecoder()
    decoder.append(bytes)
    var frames: [Frame] = []
    while let frame = try decoder.nextFrame() { frames.append(frame) }
    return frames
}

/// The one frame in `bytes`.
func decodeOneFrame(_ bytes: [UInt8]) throws(ProtocolError) -> Frame {
    let frames = try decodeFrames(bytes)
    guard frames.count == 1 else { throw .malformed("expected one frame, got \(frames.count)") }
    return frames[0]
}

/// A body written field by field, for bodies no encoder would produce.
func body(_ write: (inout ByteWriter) -> Void) -> [UInt8] {
    var writer = ByteWriter()
    write(&writer)
    return writer.bytes
}

/// A raw frame header.
func header(bodyBytes: UInt32, opcode: UInt16, flags: UInt16 = 0, requestID: UInt32 = 7, status: UInt32 = 0) -> [UInt8] {
    body { writer in
        writer.u32(bodyBytes)
        writer.u16(opcode)
        writer.u16(flags)
        writer.u32(requestID)
        writer.u32(status)
    }
}

/// Expects `body` to throw a `ProtocolError` that maps to `code`.
func expectError(_ code: WireError, _ comment: Comment? = nil, sourceLocation: SourceLocation = #_sourceLocation,
                 _ body: () throws(ProtocolError) -> Void) {
    do {
        try body()
        Issue.record("expected \(code), got success. \(comment.map { "\($0)" } ?? "")", sourceLocation: sourceLocation)
    } catch {
        #expect(error.wireError == code, "\(error). \(comment.map { "\($0)" } ?? "")", sourceLocation: sourceLocation)
    }
}
