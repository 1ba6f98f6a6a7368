import KVTierCodec
import KVTierCore
import KVTierStore
import KVTierStoreTesting
import Testing

/// The catalog journal: every acknowledged change survives a crash, a torn append loses only
/// itself, damage is kept aside, and compaction keeps the state.
@Suite struct SessionCatalogTests {
    static let model = ModelSpec(id: 0x51, name: "m", layers: 2, kvHeads: 2, headDim: 32, elementType: .bfloat16, pageTokens: 16)
    static let tenant = TenantID(1000)

    static func id(_ name: String) -> SessionID { SessionID(tenant: tenant, name: name) }

    /// Sessions as a comparable value.
    static func contents(_ catalog: SessionCatalog) -> [String: Session] {
        Dictionary(uniqueKeysWithValues: catalog.sessions(of: tenant).map { ($0.name, $0) })
    }

    @Test func replayRebuildsModelsSessionsAndHolds() throws {
        let storage = SimulatedStorage(seed: 1)
        let expected: [String: Session]
        do {
            let catalog = try SessionCatalog(storage: storage, logger: quietLogger)
            try catalog.record(Self.model)
            try catalog.store(Self.id("a"), model: Self.model, tokens: Array(0..<40), now: 10)
            try catalog.store(Self.id("a"), model: Self.model, tokens: Array(0..<70), now: 11)  // extends
            try catalog.store(Self.id("b"), model: Self.model, tokens: [9, 9, 9], now: 12)
            try catalog.store(Self.id("b"), model: Self.model, tokens: Array(100..<120), now: 13)  // replaces
            _ = try catalog.fork(Self.id("a"), to: Self.id("c"), now: 14)
            try catalog.setPinned(Self.id("c"), true, now: 15)
            try catalog.setTTL(Self.id("b"), seconds: 30, now: 16)
            try catalog.store(Self.id("d"), model: Self.model, tokens: [1], now: 17)
            try catalog.delete(Self.id("d"))
            expected = Self.contents(catalog)
            #expect(expected.keys.sorted() == ["a", "b", "c"])
            #expect(expected["a"]!.tokens == Array(0..<70) && expected["b"]!.tokens == Array(100..<120))
        }
        storage.crash()  // everything above was synced before it returned
        let catalog = try SessionCatalog(storage: storage, logger: quietLogger)
        #expect(Self.contents(catalog) == expected)
        #expect(catalog.models == [Self.model])
        let keys = PageKeyChain.keys(modelID: Self.model.id, tokens: Array(0..<70), pageTokens: 16)
        #expect(catalog.hold(on: PageAddress(tenant: Self.tenant, key: keys[4])) == .pinned, "c (pinned) ends on a's tail page")
        #expect(catalog.pinnedBytes == 70 * Self.model.bytesPerToken)
        #expect(catalog.hold(on: PageAddress(tenant: TenantID(7), key: keys[0])) == .none)
    }

    /// Cutting the journal anywhere inside its last record loses that record only.
    @Test func aTornLastRecordLosesOnlyItself() throws {
        let full = SimulatedStorage(seed: 2)
        var sizes: [Int] = []
        do {
            let catalog = try SessionCatalog(storage: full, logger: quietLogger)
            try catalog.store(Self.id("first"), model: Self.model, tokens: Array(0..<33), now: 1)
            sizes.append(try full.open("CATALOG", .read).size())
            try catalog.store(Self.id("second"), model: Self.model, tokens: Array(0..<50), now: 2)
            sizes.append(try full.open("CATALOG", .read).size())
        }
        var bytes = [UInt8](repeating: 0, count: sizes[1])
        _ = try bytes.withUnsafeMutableBytes { try full.open("CATALOG", .read).read(into: $0, at: 0) }
        for cut in stride(from: sizes[0], to: sizes[1], by: 7) {
            let storage = SimulatedStorage(seed: 3)
            let file = try storage.open("CATALOG", .readWriteCreate)
            try file.write(Array(bytes[0..<cut]), at: 0)
            try file.sync()
            let catalog = try SessionCatalog(storage: storage, logger: quietLogger)
            #expect(Self.contents(catalog).keys.sorted() == ["first"], "cut at \(cut)")
            #expect(!(try storage.list("")).contains { $0.hasPrefix("CATALOG.corrupt") }, "a torn tail is not damage")
            // The journal goes on after the cut.
            try catalog.store(Self.id("third"), model: Self.model, tokens: [5], now: 3)
            #expect(Self.contents(try SessionCatalog(storage: storage, logger: quietLogger)).keys.sorted() == ["first", "third"])
        }
    }

    @Test func damageBeforeTheEndIsKeptAside() throws {
        let storage = SimulatedStorage(seed: 4)
        var firstEnd = 0
        do {
            let catalog = try SessionCatalog(storage: storage, logger: quietLogger)
            try catalog.store(Self.id("first"), model: Self.model, tokens: Array(0..<10), now: 1)
            firstEnd = try storage.open("CATALOG", .read).size()
            try catalog.store(Self.id("second"), model: Self.model, tokens: Array(0..<20), now: 2)
            try catalog.store(Self.id("third"), model: Self.model, tokens: Array(0..<30), now: 3)
        }
        storage.corrupt("CATALOG", at: firstEnd + 20, bit: 3)
        let catalog = try SessionCatalog(storage: storage, logger: quietLogger)
        #expect(Self.contents(catalog).keys.sorted() == ["first"])
        #expect(try storage.list("").contains { $0.hasPrefix("CATALOG.corrupt-") })
    }

    @Test func compactionKeepsTheStateAndShrinksTheFile() throws {
        let storage = SimulatedStorage(seed: 5)
        let expected: [String: Session]
        do {
            let catalog = try SessionCatalog(storage: storage, logger: quietLogger)
            // Many replacements of a few sessions: the journal grows past 1 MiB, the state does not.
            for round in 0..<120 {
                for name in ["x", "y"] {
                    try catalog.store(Self.id(name), model: Self.model, tokens: (0..<2_000).map { UInt32($0 * 31 + round) }, now: UInt64(round))
                }
            }
            expected = Self.contents(catalog)
        }
        let size = try storage.open("CATALOG", .read).size()
        #expect(size < 1 << 20, "rewritten: \(size) bytes")
        storage.crash()
        #expect(Self.contents(try SessionCatalog(storage: storage, logger: quietLogger)) == expected)
        #expect(!storage.exists("CATALOG.tmp"))
    }

    /// 2,500 models with 1 KiB names (2.6 MB of live catalog): compaction used to estimate a
    /// model at 64 bytes, so past 1 MiB every registration rewrote and synced the whole catalog.
    /// Now it follows the real live size and waits for the file to double since its last
    /// rewrite; nothing is lost on replay.
    @Test func registeringManyModelsDoesNotRewriteTheCatalogEachTime() throws {
        let storage = SimulatedStorage(seed: 9)
        let name = String(repeating: "n", count: 1_000)
        let models = (0..<2_500).map { ModelSpec(id: 0x9000 + UInt64($0), name: "\(name)\($0)", layers: 2, kvHeads: 2, headDim: 32,
                                                  elementType: .float16, pageTokens: 16) }
        do {
            let catalog = try SessionCatalog(storage: storage, logger: quietLogger)
            for model in models { try catalog.record(model) }
            // Sessions replaced many times over: garbage that compaction must still collect.
            for round in 0..<700 {
                try catalog.store(Self.id("x"), model: Self.model, tokens: (0..<4_000).map { UInt32($0 * 31 + round) }, now: UInt64(round))
            }
            #expect(catalog.compactions <= 3, "rewrites: \(catalog.compactions)")
            #expect(catalog.compactions >= 1, "the replaced sessions' garbage was collected")
        }
        storage.crash()
        let replayed = try SessionCatalog(storage: storage, logger: quietLogger)
        #expect(replayed.models.count == models.count + 1)
        #expect(Self.contents(replayed)["x"]?.tokens.first == 699)
    }

    /// Random damage (overwritten bytes, cuts, appended garbage) never crashes replay, and what
    /// it keeps is a state the journal really passed through: each session it returns has
    /// tokens some acknowledged change gave it.
    @Test func randomDamageReplaysToARealEarlierState() throws {
        let original = SimulatedStorage(seed: 7)
        var history: [String: Set<[UInt32]>] = [:]
        do {
            let catalog = try SessionCatalog(storage: original, logger: quietLogger)
            var random = SplitMix64(seed: 8)
            for step in 0..<60 {
                let name = "s\(random.next() % 6)"
                let tokens = (0..<Int(random.next() % 40 + 1)).map { UInt32($0 * 3 + step % 5) }
                switch random.next() % 4 {
                case 0: try? catalog.delete(Self.id(name))
                case 1: _ = try? catalog.fork(Self.id(name), to: Self.id(name + "f"), now: UInt64(step))
                default: try catalog.store(Self.id(name), model: Self.model, tokens: tokens, now: UInt64(step))
                }
                for session in catalog.sessions(of: Self.tenant) { history[session.name, default: []].insert(session.tokens) }
            }
        }
        let file = try original.open("CATALOG", .read)
        var bytes = [UInt8](repeating: 0, count: try file.size())
        _ = try bytes.withUnsafeMutableBytes { try file.read(into: $0, at: 0) }
        var random = SplitMix64(seed: 9)
        for round in 0..<200 {
            var damaged = bytes
            switch round % 3 {
            case 0:
                for _ in 0..<Int(random.next() % 4 + 1) {
                    damaged[Int(random.next() % UInt64(damaged.count))] = UInt8(truncatingIfNeeded: random.next())
                }
            case 1: damaged.removeLast(Int(random.next() % UInt64(damaged.count)))
            default: damaged += (0..<Int(random.next() % 64 + 1)).map { _ in UInt8(truncatingIfNeeded: random.next()) }
            }
            let storage = SimulatedStorage(seed: 10)
            let copy = try storage.open("CATALOG", .readWriteCreate)
            try copy.write(damaged, at: 0)
            try copy.sync()
            let catalog = try SessionCatalog(storage: storage, logger: quietLogger)
            for session in catalog.sessions(of: Self.tenant) {
                #expect(history[session.name]?.contains(session.tokens) == true, "round \(round): \(session.name) has tokens it never had")
            }
        }
    }

    /// A change that fails to reach the disk (here: the disk is full) leaves neither memory nor
    /// the journal changed, so retrying it later replays to exactly what memory holds.
    @Test func aFailedWriteChangesNothingAndARetryReplaysCleanly() throws {
        let storage = SimulatedStorage(seed: 11)
        let catalog = try SessionCatalog(storage: storage, logger: quietLogger)
        try catalog.store(Self.id("a"), model: Self.model, tokens: Array(0..<10), now: 1)
        try catalog.store(Self.id("gone"), model: Self.model, tokens: [1], now: 1)
        storage.faults = SimulatedStorage.Faults(capacityBytes: storage.usedBytes)
        #expect(throws: StoreError.self) { try catalog.store(Self.id("a"), model: Self.model, tokens: Array(0..<40), now: 2) }
        #expect(throws: StoreError.self) { try catalog.delete(Self.id("gone")) }
        #expect(Self.contents(catalog)["a"]?.tokens == Array(0..<10) && Self.contents(catalog)["gone"] != nil)
        storage.faults = SimulatedStorage.Faults()
        try catalog.delete(Self.id("gone"))
        try catalog.store(Self.id("a"), model: Self.model, tokens: Array(0..<40), now: 3)
        let expected = Self.contents(catalog)
        storage.crash()
        #expect(Self.contents(try SessionCatalog(storage: storage, logger: quietLogger)) == expected)
    }

    @Test func aNewFileWithABadHeaderIsSetAside() throws {
        let storage = SimulatedStorage(seed: 6)
        let file = try storage.open("CATALOG", .readWriteCreate)
        try file.write([UInt8](repeating: 0x41, count: 64), at: 0)
        try file.sync()
        let catalog = try SessionCatalog(storage: storage, logger: quietLogger)
        #expect(catalog.count == 0)
        #expect(try storage.list("").contains { $0.hasPrefix("CATALOG.unreadable-") })
        try catalog.store(Self.id("fresh"), model: Self.model, tokens: [1, 2], now: 1)
        #expect(try SessionCatalog(storage: storage, logger: quietLogger).count == 1)
    }

    // MARK: a model's disk codec (an optional trailing field of the model record)

    /// A catalog file as docs/format.md describes it, built by hand: header, then records.
    static func catalogFile(_ bodies: [[UInt8]]) -> [UInt8] {
        var w = ByteWriter()
        w.u64(0x0100_5441_4354_564B)  // "KVTCAT\0\1"
        w.u32(1)
        w.u32(CRC32C.checksum(w.bytes))
        for body in bodies {
            w.u32(UInt32(body.count))
            w.u32(body.withUnsafeBytes { CRC32C.checksum($0) })
            w.raw(body)
        }
        return w.bytes
    }

    /// The body of a model record in the format of every catalog before disk codecs.
    static func modelRecordBody(_ m: ModelSpec) -> [UInt8] {
        var w = ByteWriter()
        w.u8(1)
        w.u64(m.id)
        w.u16(UInt16(m.name.utf8.count))
        w.raw(m.name.utf8)
        w.u16(UInt16(m.layers))
        w.u16(UInt16(m.kvHeads))
        w.u16(UInt16(m.headDim))
        w.u8(m.elementType.rawValue)
        w.u32(UInt32(m.pageTokens))
        w.u32(m.ropeTheta.bitPattern)
        return w.bytes
    }

    static func fileBytes(_ storage: SimulatedStorage) throws -> [UInt8] {
        let file = try storage.open("CATALOG", .read)
        var bytes = [UInt8](repeating: 0, count: try file.size())
        _ = try bytes.withUnsafeMutableBytes { try file.read(into: $0, at: 0) }
        return bytes
    }

    @Test func aCatalogFromBeforeDiskCodecsLoadsAndAModelsCodecIsKept() throws {
        let old = ModelSpec(id: 0x61, name: "old", layers: 2, kvHeads: 2, headDim: 32, elementType: .float16, pageTokens: 16, ropeTheta: 10_000)
        let oldFile = Self.catalogFile([Self.modelRecordBody(old)])
        let storage = SimulatedStorage(seed: 9)
        let file = try storage.open("CATALOG", .readWriteCreate)
        try file.write(oldFile, at: 0)
        try file.sync()
        file.close()
        try storage.syncDirectory("")  // as an earlier daemon left it: durable
        var lossless = old
        lossless.id = 0x62
        lossless.diskCodec = Codec(.fp16, .zstd(level: 1))
        do {
            let catalog = try SessionCatalog(storage: storage, logger: quietLogger)
            #expect(catalog.models == [old], "the old record loads, with no codec")
            try catalog.record(lossless)
            try catalog.store(Self.id("s"), model: lossless, tokens: Array(0..<20), now: 1)  // syncs the model record too
            // Appended after the old bytes, untouched: the model record is the old layout plus
            // the codec's canonical name as a string.
            let bytes = try Self.fileBytes(storage)
            let codecBody = Self.modelRecordBody(lossless) + [9, 0] + Array("fp16+zstd".utf8)
            #expect(Array(bytes.prefix(oldFile.count + 8 + codecBody.count)) == Self.catalogFile([Self.modelRecordBody(old), codecBody]))
        }
        storage.crash()
        let catalog = try SessionCatalog(storage: storage, logger: quietLogger)
        #expect(Set(catalog.models) == [old, lossless], "the codec survives a restart")
        #expect(catalog.session(Self.id("s"))?.modelID == lossless.id)
    }

    @Test func aModelWithoutCodecIsWrittenAsBefore() throws {
        let storage = SimulatedStorage(seed: 10)
        let catalog = try SessionCatalog(storage: storage, logger: quietLogger)
        try catalog.record(Self.model)
        try catalog.store(Self.id("s"), model: Self.model, tokens: [1, 2, 3], now: 1)
        let expected = Self.catalogFile([Self.modelRecordBody(Self.model)])
        #expect(Array(try Self.fileBytes(storage).prefix(expected.count)) == expected)
    }

    /// A codec this build cannot parse is damage, never a model silently stored with another codec.
    @Test func anUnknownCodecNameDoesNotLoad() throws {
        let storage = SimulatedStorage(seed: 11)
        let file = try storage.open("CATALOG", .readWriteCreate)
        let bad = Self.modelRecordBody(Self.model) + [4, 0] + Array("fp32".utf8)
        try file.write(Self.catalogFile([bad]), at: 0)
        try file.sync()
        file.close()
        #expect(try SessionCatalog(storage: storage, logger: quietLogger).models.isEmpty)
    }
}
