@preconcurrency import Glibc
import KVTierCore
import KVTierRemote
import Testing

@Suite struct RemoteSecretsTests {
    let directory: String

    init() throws {
        var template = Array("/tmp/kvs-XXXXXX".utf8CString)
        directory = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
    }

    func file(_ name: String, _ bytes: [UInt8], mode: mode_t = 0o600) -> String {
        let path = "\(directory)/\(name)"
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode)
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        close(fd)
        chmod(path, mode)
        return path
    }

    @Test func keyFromHexRawOrEnvironment() throws {
        let raw = (0..<32).map { UInt8($0 * 7 + 1) }
        let hex = raw.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined()
        let fromHex = try RemoteSecrets.key(file: file("hex", Array((hex + "\n").utf8)), environment: [:])
        let fromRaw = try RemoteSecrets.key(file: file("raw", raw), environment: [:])
        let fromEnvironment = try RemoteSecrets.key(file: nil, environment: [RemoteSecrets.keyEnvironment: hex.uppercased()])
        #expect(fromHex == fromRaw)
        #expect(fromEnvironment == fromRaw)
        #expect(fromRaw == DigestKey(bytes: raw))
    }

    @Test func badKeysAreRefusedWithTheFix() {
        func reason(_ body: () throws -> DigestKey) -> String {
            do { _ = try body(); return "accepted" } catch { return "\(error)" }
        }
        #expect(reason { try RemoteSecrets.key(file: nil, environment: [:]) }.contains("remoteKeyFile"))
        #expect(reason { try RemoteSecrets.key(file: file("short", Array("abcd".utf8)), environment: [:]) }.contains("64 hexadecimal"))
        #expect(reason { try RemoteSecrets.key(file: file("nothex", Array(String(repeating: "zz", count: 32).utf8)), environment: [:]) }.contains("64 hexadecimal"))
        let open = file("open", Array(String(repeating: "ab", count: 32).utf8), mode: 0o644)
        #expect(reason { try RemoteSecrets.key(file: open, environment: [:]) }.contains("chmod o-rwx"))
        #expect(reason { try RemoteSecrets.key(file: "\(directory)/missing", environment: [:]) }.contains("cannot be opened"))
    }

    @Test func passwordFromFileOrEnvironment() throws {
        #expect(try RemoteSecrets.password(file: file("pw", Array("s3cret\n".utf8)), environment: [:]) == "s3cret")
        #expect(try RemoteSecrets.password(file: nil, environment: [RemoteSecrets.passwordEnvironment: "env"]) == "env")
        #expect(try RemoteSecrets.password(file: nil, environment: [:]) == nil)
        #expect(throws: RemoteSecrets.Invalid.self) { try RemoteSecrets.password(file: file("two", Array("a\nb\n".utf8)), environment: [:]) }
    }
}
