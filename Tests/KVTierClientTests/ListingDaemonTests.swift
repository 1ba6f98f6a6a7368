@preconcurrency import Glibc
import Foundation
import KVTierClient
import KVTierCore
import KVTierProtocol
import Testing

/// Findings 7 and 10 against a real kvtierd: MODELS and SESSION_LIST page, so no reply outgrows
/// a control frame whatever a tenant registered or stored, and model registrations are limited
/// per tenant with an error that names the limit.
@Suite(.serialized, .enabled(if: DaemonProcess.binary != nil, DaemonProcess.skipReason))
struct ListingDaemonTests {
    static func model(_ index: Int, nameBytes: Int = 255) -> ModelSpecification {
        let suffix = "-\(index)"
        return ModelSpecification(name: String(repeating: "m", count: nameBytes - suffix.utf8.count) + suffix, layers: 1, kvHeads: 1,
                                  headDim: 8, elementType: .float16, pageTokens: 16, ropeTheta: 10_000)
    }

    /// 1,100 models with 255-byte names (more than one page of `maxListEntries`).
    @Test func modelsPageAndEveryPageFitsAFrame() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("kvtier-models-\(getpid())-\(UInt32.random(in: 0 ... .max))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let config = directory.appendingPathComponent("kvtierd.json").path
        try #"{"maxModelsPerTenant": 1100}"#.write(toFile: config, atomically: true, encoding: .utf8)
        let daemon = try await DaemonProcess.start(arguments: ["--config", config])
        defer { daemon.stop() }
        let client = try await KVTierClient.connect(socketPath: daemon.socketPath, replyTimeoutSeconds: 30)
        var ids: [UInt64] = []
        for index in 0..<1_100 { ids.append(try await client.registerModel(Self.model(index)).modelID) }
        await #expect(throws: KVTierClientError.self) { _ = try await client.registerModel(Self.model(1_100)) }
        let listed = try await client.models()
        #expect(listed.map(\.modelID) == ids.sorted(), "every model, by id, across two pages")
        #expect(listed.allSatisfy { $0.registration.name.utf8.count == 255 })
        await client.close()

        let raw = try RawConnection(path: daemon.socketPath)
        try raw.hello()
        guard case .models(let last)? = try raw.call(.models(ListPage(offset: 1_024, limit: 1_024))) else {
            Issue.record("MODELS from 1024 was not answered with a page")
            return
        }
        #expect(last.total == 1_100 && last.models.count == 76)
        // A page past the limit is refused from the request alone.
        var tooMany = ByteWriter()
        tooMany.u32(0)
        tooMany.u32(UInt32(ProtocolLimits.maxListEntries + 1))
        raw.send(RawConnection.frame(opcode: Opcode.models.rawValue, body: tooMany.bytes))
        let refused = try #require(try raw.reply())
        #expect(refused.header.status == WireError.tooLarge.rawValue)
    }

    @Test func theDefaultModelLimitNamesItsKey() async throws {
        let daemon = try await DaemonProcess.start()
        defer { daemon.stop() }
        let client = try await KVTierClient.connect(socketPath: daemon.socketPath, replyTimeoutSeconds: 30)
        for index in 0..<256 { _ = try await client.registerModel(Self.model(index, nameBytes: 40)) }
        _ = try await client.registerModel(Self.model(7, nameBytes: 40))  // again: free
        do {
            _ = try await client.registerModel(Self.model(256, nameBytes: 40))
            Issue.record("the 257th model was registered")
        } catch KVTierClientError.server(let code, let message) {
            #expect(code == .overBudget && message.contains("maxModelsPerTenant"), "\(message)")
        }
        await #expect(throws: KVTierClientError.self, "a 256-byte name") { _ = try await client.registerModel(Self.model(1, nameBytes: 256)) }
        await client.close()
    }

    /// 30 sessions, listed 7 at a time: the pages put together are the whole list, most recently
    /// used first, and `total` says how many there are.
    @Test func sessionListPages() async throws {
        let daemon = try await DaemonProcess.start()
        defer { daemon.stop() }
        let client = try await KVTierClient.connect(socketPath: daemon.socketPath, replyTimeoutSeconds: 30)
        let model = try await client.registerModel(Self.model(0, nameBytes: 20))
        let tokens = (0..<16).map { UInt32($0) }
        let kv = [UInt16](repeating: 0x3C00, count: model.shape.elements(tokens: 16))
        for index in 0..<30 { try await client.put(model, tokens: tokens, keys: kv, values: kv, session: "session-\(index)") }
        let all = try await client.sessionList()
        #expect(all.map(\.name) == (0..<30).reversed().map { "session-\($0)" })
        #expect(all.allSatisfy { $0.tokens == 16 && $0.modelID == model.modelID })
        await client.close()

        let raw = try RawConnection(path: daemon.socketPath)
        try raw.hello()
        var paged: [SessionEntry] = []
        for offset in stride(from: 0, to: 35, by: 7) {
            guard case .sessionList(let page)? = try raw.call(.sessionList(ListPage(offset: UInt32(offset), limit: 7))) else {
                Issue.record("SESSION_LIST from \(offset) was not answered with a page")
                return
            }
            #expect(page.total == 30 && page.sessions.count == min(7, max(0, 30 - offset)))
            paged += page.sessions
        }
        #expect(paged == all)
    }
}
