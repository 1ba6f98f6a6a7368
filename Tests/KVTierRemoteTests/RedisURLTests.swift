import KVTierCore
import KVTierRemote
import KVTierSystem
import Testing

@Suite struct RedisURLTests {
    @Test func acceptedForms() throws {
        #expect(try RedisURL.parse("redis://cache.internal") == RedisURL(endpoint: .tcp(host: "cache.internal", port: 6379)))
        #expect(try RedisURL.parse("redis://10.0.0.7:6380/3") == RedisURL(endpoint: .tcp(host: "10.0.0.7", port: 6380), database: 3))
        #expect(try RedisURL.parse("redis://kvtier@[::1]:7000/") == RedisURL(endpoint: .tcp(host: "::1", port: 7000), username: "kvtier"))
        #expect(try RedisURL.parse("unix:///run/redis/redis.sock") == RedisURL(endpoint: .unix(path: "/run/redis/redis.sock")))
        #expect(try RedisURL.parse("unix:///tmp/r.sock?db=2") == RedisURL(endpoint: .unix(path: "/tmp/r.sock"), database: 2))
        // What logs and --print-config show parses back to the same URL.
        for text in ["redis://a-b.c:1/2", "redis://u@[fe80::1]:6379/0", "unix:///x/y.sock?db=5"] {
            let url = try RedisURL.parse(text)
            #expect(try RedisURL.parse(url.description) == url)
        }
    }

    @Test func refusalsSayWhatToDo() {
        func reason(_ text: String) -> String {
            do {
                _ = try RedisURL.parse(text)
                return "accepted"
            } catch { return error.description }
        }
        #expect(reason("rediss://cache:6380").contains("TLS tunnel"))
        #expect(reason("redis://user:secret@cache").contains("remotePasswordFile"))
        #expect(reason("redis://:secret@cache").contains("remotePasswordFile"))
        #expect(reason("http://cache").contains("redis://"))
        #expect(reason("redis://cache:0").contains("port"))
        #expect(reason("redis://cache:70000").contains("port"))
        #expect(reason("redis://cache/x").contains("database"))
        #expect(reason("redis://").contains("no host"))
        #expect(reason("redis://ca che").contains("spaces"))
        #expect(reason("redis://cache%20x").contains("percent"))
        #expect(reason("unix://relative.sock").contains("absolute"))
        #expect(reason("unix:///tmp/r.sock?dbx=1").contains("?db=N"))
        #expect(reason("unix:///" + String(repeating: "a", count: 200)).contains("sun_path"))
    }
}
