@preconcurrency import Glibc
import Foundation
import KVTierClient
import KVTierCore
import KVTierProtocol
import KVTierTestProcess
import Testing

/// Finding 1 of the hardening issue: whatever integers a client puts on the wire, a real kvtierd
/// answers or closes the connection, keeps serving, and keeps every stored byte. A crash shows
/// as the daemon process gone (the test names the input and the seed).
@Suite(.serialized, .enabled(if: DaemonProcess.binary != nil, DaemonProcess.skipReason))
struct HostileWireTests {
    /// fp16, 1 layer, 1 KV head, head dim 8, 16-token pages: 512-byte pages keep frames short,
    /// so cutting every frame at every byte stays cheap.
    static let spec = ModelSpecification(name: "hostile-wire", layers: 1, kvHeads: 1, headDim: 8, elementType: .float16,
                                         pageTokens: 16, ropeTheta: 10_000)
    static let pageBytes = 512

    /// A PUT naming an extent at offset 2^63 (aligned, no 64-bit overflow) trapped converting the
    /// offset to Int.
    @Test func putNamingAnExtentAtOffset2To63IsRefused() async throws {
        let daemon = try await DaemonProcess.start()
        defer { daemon.stop() }
        let model = try await Self.register(daemon)
        let raw = try RawConnection(path: daemon.socketPath)
        try raw.hello()
        let put = Put(modelID: model.modelID, tokens: (0..<16).map { UInt32($0) }, dataStart: 0,
                      data: .extents([WireExtent(offset: 1 << 63, bytes: 4096, tokens: 16)]))
        let reply = try raw.call(.put(put))
        try await Self.expectServing(daemon, after: "PUT of an extent at offset 2^63")
        guard case .error(_, let error)? = reply else { Issue.record("PUT at offset 2^63 answered \(String(describing: reply))"); return }
        #expect(error.status == WireError.invalidArgument.rawValue, "\(error)")
        #expect(error.message.contains("arena"), "the error says which limit: \(error.message)")
    }

    /// Two extents of length 0x7FFF_FFFF_FFFF_F000 overflowed the (then) fast path's projected RAM
    /// bytes before any ownership check.
    @Test func putWhoseExtentLengthsSumPastIntMaxIsRefused() async throws {
        let daemon = try await DaemonProcess.start()
        defer { daemon.stop() }
        let model = try await Self.register(daemon)
        let raw = try RawConnection(path: daemon.socketPath)
        try raw.hello()
        let huge: UInt64 = 0x7FFF_FFFF_FFFF_F000
        let put = Put(modelID: model.modelID, tokens: (0..<32).map { UInt32($0) }, dataStart: 0,
                      data: .extents([WireExtent(offset: 0, bytes: huge, tokens: 16), WireExtent(offset: 4096, bytes: huge, tokens: 16)]))
        let reply = try raw.call(.put(put))
        try await Self.expectServing(daemon, after: "PUT of two extents of 0x7FFF_FFFF_FFFF_F000 bytes")
        guard case .error(_, let error)? = reply else { Issue.record("the PUT answered \(String(describing: reply))"); return }
        #expect(error.status == WireError.invalidArgument.rawValue, "\(error)")
    }

    /// Every opcode, every integer field (header fields, counts and string lengths included) set
    /// to each boundary value; every frame cut at every byte; seeded random bodies; and valid
    /// frames sent with descriptors attached, which the daemon must not keep. After each batch
    /// the daemon answers PING and a pinned page stored first reads back byte-identical.
    /// `KVTIER_FUZZ_RANDOM_BODIES` (default 16 per opcode) raises the random share.
    @Test func boundaryValuesTruncationsNoiseAndDescriptors() async throws {
        let seed = testSeed("HostileWireTests.boundaryValuesTruncationsNoiseAndDescriptors")
        var random = SplitMix64(seed: seed)
        let randomBodies = getenv("KVTIER_FUZZ_RANDOM_BODIES").flatMap { Int(String(cString: $0)) } ?? 16
        let daemon = try await DaemonProcess.start()
        defer { daemon.stop() }
        let model = try await Self.register(daemon)
        let reference = try await Self.storeReference(model, daemon, &random)
        let started = Clocks.monotonicMicros()
        var inputs = 0

        for template in RequestTemplate.all(pageBytes: Self.pageBytes) {
            // Boundary values in every field.
            let (_, fields) = template.build(WireState(modelID: model.modelID, leaseID: 0, staging: Self.placeholderStaging)).frame(opcode: template.opcode)
            for field in fields {
                // The boundary values, and a few seeded random ones.
                let randomValues = (0..<4).map { _ in random.next() }
                for value in BoundaryValues.values(for: field) + randomValues {
                    try Self.send(template, daemon, model) { BoundaryValues.substitute(value, into: field, of: $0) }
                    inputs += 1
                }
            }
            try await Self.check(daemon, model, reference, after: "\(template.name): boundary values (seed \(seed))")

            // Every frame cut at every byte, the stream then ended.
            let length = template.build(WireState(modelID: model.modelID, leaseID: 0, staging: Self.placeholderStaging))
                .frame(opcode: template.opcode).bytes.count
            for cut in 1..<length {
                try Self.send(template, daemon, model, ending: true) { Array($0[0..<cut]) }
                inputs += 1
            }
            // Random bodies of random lengths under a valid header.
            for _ in 0..<randomBodies {
                let body = (0..<Int(random.next() % 97)).map { _ in UInt8(truncatingIfNeeded: random.next()) }
                try Self.send(template, daemon, model) { _ in RawConnection.frame(opcode: template.opcode.rawValue, body: body) }
                inputs += 1
            }
            try await Self.check(daemon, model, reference, after: "\(template.name): truncations and random bodies (seed \(seed))")
        }

        // Descriptors attached to every kind of frame: the daemon reads without a control
        // buffer, so the kernel must close them; /proc/PID/fd must come back to where it was.
        let before = try #require(openDescriptorCount(daemon.pid), "cannot read /proc/\(daemon.pid)/fd")
        for template in RequestTemplate.all(pageBytes: Self.pageBytes) {
            var pipeEnds: [Int32] = [-1, -1]
            #expect(pipe(&pipeEnds) == 0)
            var pair: [Int32] = [-1, -1]
            #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0)
            let devNull = open("/dev/null", O_RDONLY)
            let attached = [pipeEnds[0], pipeEnds[1], pair[0], devNull]
            try Self.send(template, daemon, model, descriptors: attached) { $0 }
            for descriptor in attached + [pair[1]] { close(descriptor) }
            inputs += 1
        }
        try await Self.check(daemon, model, reference, after: "frames with descriptors attached (seed \(seed))")
        let deadline = Clocks.monotonicMicros() + 60_000_000
        var after = openDescriptorCount(daemon.pid) ?? .max
        while after > before, Clocks.monotonicMicros() < deadline {
            usleep(20_000)
            after = openDescriptorCount(daemon.pid) ?? .max
        }
        #expect(after <= before, "kvtierd held \(before) descriptors before the frames with descriptors attached and \(after) after")

        let seconds = Double(Clocks.monotonicMicros() - started) / 1e6
        print("HostileWireTests: seed \(seed), \(inputs) inputs tried in \(String(format: "%.1f", seconds)) s, 0 crashes, reference page byte-identical")
        #expect(inputs > 2_000, "the fuzz must actually run (\(inputs) inputs)")
    }

    // MARK: helpers

    /// Extents of the right shape for computing field offsets (lengths do not depend on values).
    static let placeholderStaging = [WireExtent(offset: 0, bytes: 4096, tokens: 0), WireExtent(offset: 4096, bytes: 4096, tokens: 0)]

    static func register(_ daemon: DaemonProcess) async throws -> RegisteredModel {
        let client = try await KVTierClient.connect(socketPath: daemon.socketPath, replyTimeoutSeconds: 30)
        defer { Task { await client.close() } }
        return try await client.registerModel(spec)
    }

    /// Two pages in a pinned session (so no fuzzed EVICT may move or delete them), durable.
    static func storeReference(_ model: RegisteredModel, _ daemon: DaemonProcess, _ random: inout SplitMix64) async throws -> (tokens: [UInt32], kv: CachedKV) {
        let tokens = (0..<32).map { _ in UInt32.random(in: 0..<50_000, using: &random) }
        let count = spec.shape.elements(tokens: tokens.count)
        let keys = (0..<count).map { _ in UInt16.random(in: 0...0x7BFF, using: &random) }
        let values = (0..<count).map { _ in UInt16.random(in: 0...0x7BFF, using: &random) }
        let client = try await KVTierClient.connect(socketPath: daemon.socketPath, replyTimeoutSeconds: 30)
        try await client.put(model, tokens: tokens, keys: keys, values: values, session: "hostile-reference")
        try await client.sessionPin("hostile-reference")
        let kv = try await client.get(model, tokens: tokens)
        await client.close()
        #expect(kv.tokens == tokens.count && kv.keys == keys && kv.values == values, "the reference page reads back as stored")
        return (tokens, kv)
    }

    /// The daemon is running and answers PING on a fresh connection.
    static func expectServing(_ daemon: DaemonProcess, after input: String) async throws {
        do {
            guard !EventWaits.hasExited(daemon.pid) else { throw TestFailure("exited") }
            let client = try await KVTierClient.connect(socketPath: daemon.socketPath, replyTimeoutSeconds: 30)
            try await client.ping()
            await client.close()
        } catch {
            // A trap takes a moment to end the process (the runtime prints a backtrace first):
            // wait for its exit on a thread of its own, not the cooperative pool.
            let pid = daemon.pid
            if await EventWaits.onThread({ EventWaits.exit(of: pid, until: Date().addingTimeInterval(30)) }) { throw TestFailure("kvtierd died after \(input):\n\(daemon.logTail())") }
            throw TestFailure("kvtierd does not answer PING after \(input): \(error)")
        }
    }

    /// Serving, and the reference page reads back byte-identical.
    static func check(_ daemon: DaemonProcess, _ model: RegisteredModel, _ reference: (tokens: [UInt32], kv: CachedKV),
                      after input: String) async throws {
        try await expectServing(daemon, after: input)
        let client = try await KVTierClient.connect(socketPath: daemon.socketPath, replyTimeoutSeconds: 30)
        let kv = try await client.get(model, tokens: reference.tokens)
        await client.close()
        guard kv == reference.kv else { throw TestFailure("the reference page changed after \(input)") }
    }

    /// One input on a fresh connection: `HELLO` (unless the template is `HELLO`) and an `ALLOC`
    /// whose staging extents and lease the template may name, then the mutated frame and a PING;
    /// the stream is ended and every reply read until the daemon closes (30 s at most).
    static func send(_ template: RequestTemplate, _ daemon: DaemonProcess, _ model: RegisteredModel, ending: Bool = false,
                     descriptors: [Int32] = [], mutate: ([UInt8]) -> [UInt8]) throws {
        let connection: RawConnection
        do {
            guard !EventWaits.hasExited(daemon.pid) else { throw TestFailure("exited") }
            connection = try RawConnection(path: daemon.socketPath)
        } catch {
            let died = EventWaits.exit(of: daemon.pid, until: Date().addingTimeInterval(30))
            throw TestFailure("kvtierd \(died ? "died" : "refused a connection") after the input before this \(template.name) one:\n\(daemon.logTail())")
        }
        var state = WireState(modelID: model.modelID, leaseID: 0, staging: placeholderStaging)
        if !template.isHello {
            try connection.hello()
            guard case .alloc(let staged)? = try connection.call(.alloc(Alloc(byteCounts: [UInt64(pageBytes), UInt64(pageBytes)]))) else {
                throw TestFailure("ALLOC before a \(template.name) input was not answered")
            }
            state = WireState(modelID: model.modelID, leaseID: staged.leaseID, staging: staged.extents)
        }
        let frame = mutate(template.build(state).frame(opcode: template.opcode).bytes)
        connection.send(frame, descriptors: descriptors)
        if !ending { connection.send(RawConnection.frame(opcode: Opcode.ping.rawValue, body: [], requestID: 99)) }
        connection.shutdownSending()
        do { try connection.drainUntilClosed() } catch {
            throw TestFailure("kvtierd did not close a connection after a \(template.name) input (\(frame.prefix(64))): \(error)")
        }
    }
}
