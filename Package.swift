// swift-tools-version:6.0
import PackageDescription

// Module layout and dependency direction: see docs/architecture.md.
let package = Package(
    name: "KVTier",
    platforms: [.macOS(.v14)],
    products: [
        .library(name: "KVTierCodec", targets: ["KVTierCodec"]),
        .library(name: "KVTierClient", targets: ["KVTierClient"]),
        .executable(name: "kvtier", targets: ["kvtier"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
    ],
    targets: [
        // System libraries (Debian: liblz4-dev, libzstd-dev, liburing-dev).
        .systemLibrary(name: "CLZ4", pkgConfig: "liblz4", providers: [.apt(["liblz4-dev"])]),
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CURing", pkgConfig: "liburing", providers: [.apt(["liburing-dev"])]),

        // SIMD kernels in C with runtime CPU dispatch; always optimized, never FMA-contracted.
        .target(
            name: "CKVTierKernels",
            cSettings: [.unsafeFlags(["-O3", "-ffp-contract=off"])]
        ),

        .target(name: "KVTierCore", dependencies: ["CKVTierKernels"]),
        // Every system call wrapper, once: files, Unix sockets and SCM_RIGHTS, pipes and poll,
        // threads, memfd arenas; `Errno` thrown, EINTR retried in one place.
        .target(
            name: "KVTierSystem",
            dependencies: ["KVTierCore", .product(name: "SystemPackage", package: "swift-system")]
        ),
        // `--version` of both executables: git describe at build time (scripts/version).
        .plugin(name: "BuildVersion", capability: .buildTool()),
        .target(name: "KVTierBuildInfo", plugins: ["BuildVersion"]),
        .target(name: "KVTierCodec", dependencies: ["KVTierCore", "CKVTierKernels", "CLZ4", "CZstd"]),
        .target(
            name: "KVTierTools",
            dependencies: [
                "KVTierCore", "KVTierCodec", "KVTierStore", "KVTierIO", "CKVTierKernels", "KVTierClient", "KVTierRemote",
                "KVTierSystem",
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Tiers, index, page files (format and recovery), behind the `Storage` protocol.
        .target(
            name: "KVTierStore",
            dependencies: ["KVTierCore", "KVTierCodec", .product(name: "Logging", package: "swift-log")]
        ),
        // liburing behind plain C functions: <liburing.h> cannot be imported beside Glibc and
        // swift-system (see Sources/CKVTierURingShim/include/kvtier_uring.h).
        .target(
            name: "CKVTierURingShim",
            dependencies: ["CURing"],
            linkerSettings: [.linkedLibrary("uring")]
        ),
        // The remote tier (T3) on Redis/Valkey: RESP2 (the project's one RESP client), Redis URLs,
        // secrets, and `RedisRemoteTier`, KVTierStore's `RemoteTier`.
        .target(
            name: "KVTierRemote",
            dependencies: [
                "KVTierStore", "KVTierSystem", "KVTierCore",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Wire frames of the kvtierd protocol (docs/protocol.md): pure encode/decode, no I/O.
        .target(name: "KVTierProtocol", dependencies: ["KVTierCore"]),
        // Swift client of kvtierd: one connection, shared-memory or inline page transfer.
        .target(
            name: "KVTierClient",
            dependencies: ["KVTierProtocol", "KVTierCore", "KVTierSystem", .product(name: "SystemPackage", package: "swift-system")]
        ),
        // Linux block reads for the disk tier: io_uring with a pread thread-pool fallback.
        .target(
            name: "KVTierIO",
            dependencies: [
                "KVTierStore",
                "KVTierSystem",
                "CKVTierURingShim",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // kvtierd's transport: listener, peer credentials, connections, HELLO; requests go to a handler.
        .target(
            name: "KVTierServer",
            dependencies: [
                "KVTierProtocol", "KVTierCore", "KVTierSystem",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        // kvtierd's wiring: configuration, the store behind the server's request handler, systemd
        // notify and socket activation, Prometheus metrics on a loopback HTTP endpoint.
        .target(
            name: "KVTierDaemon",
            dependencies: [
                "KVTierServer", "KVTierStore", "KVTierIO", "KVTierSystem", "KVTierProtocol", "KVTierCodec", "KVTierCore",
                "KVTierRemote",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ]
        ),
        .executableTarget(
            name: "kvtierd",
            dependencies: [
                "KVTierDaemon", "KVTierCore", "KVTierBuildInfo",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "kvtier",
            dependencies: [
                "KVTierCore", "KVTierCodec", "KVTierStore", "KVTierIO", "KVTierTools", "KVTierClient", "KVTierProtocol",
                "KVTierBuildInfo",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),

        .testTarget(name: "KVTierCoreTests", dependencies: ["KVTierCore", "CKVTierKernels"]),
        .testTarget(
            name: "KVTierSystemTests",
            dependencies: ["KVTierSystem", "KVTierCore", .product(name: "SystemPackage", package: "swift-system")]
        ),
        .testTarget(name: "KVTierCodecTests", dependencies: ["KVTierCodec", "KVTierCore", "CKVTierKernels"]),
        .testTarget(
            name: "KVTierToolsTests",
            dependencies: [
                "KVTierTools", "KVTierCodec", "KVTierCore", "KVTierStore", "KVTierStoreTesting", "KVTierIO", "CKVTierKernels",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(name: "KVTierProtocolTests", dependencies: ["KVTierProtocol", "KVTierCore"]),
        // Starting and waiting for test children (kvtierd, kvtier): one copy for the suites that do.
        .target(
            name: "KVTierTestProcess",
            dependencies: ["KVTierSystem", .product(name: "SystemPackage", package: "swift-system")],
            path: "Tests/KVTierTestProcess"
        ),
        .testTarget(
            name: "KVTierClientTests",
            dependencies: [
                "KVTierClient", "KVTierProtocol", "KVTierCore", "KVTierSystem", "KVTierTestProcess",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        // SimulatedStorage: the disk tier's storage in memory, with seeded faults (tests only).
        .target(name: "KVTierStoreTesting", dependencies: ["KVTierStore", "KVTierCore"], path: "Tests/KVTierStoreTesting"),
        .testTarget(
            name: "KVTierDiskTests",
            dependencies: [
                "KVTierStore", "KVTierIO", "KVTierTools", "KVTierCodec", "KVTierCore",
                "KVTierDaemon", "KVTierServer", "KVTierProtocol", "KVTierTestProcess", "KVTierStoreTesting",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "KVTierStoreTests",
            dependencies: ["KVTierStore", "KVTierStoreTesting", "KVTierTools", "KVTierCodec", "KVTierCore", .product(name: "Logging", package: "swift-log")]
        ),
        // The remote tier against real redis-server processes (skipped, saying why, without one).
        .testTarget(
            name: "KVTierRemoteTests",
            dependencies: [
                "KVTierRemote", "KVTierStore", "KVTierStoreTesting", "KVTierIO", "KVTierSystem", "KVTierCore", "KVTierTestProcess",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "KVTierIOTests",
            dependencies: [
                "KVTierIO", "KVTierSystem",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // kvtierd as operators run it: systemd units, socket activation and sd_notify, configuration
        // errors and SIGHUP, /metrics, `kvtier status`, `top` and the cache commands (real processes).
        .testTarget(name: "KVTierOpsTests", dependencies: ["KVTierDaemon", "KVTierServer", "KVTierStore", "KVTierIO", "KVTierClient", "KVTierProtocol", "KVTierCodec", "KVTierCore", "KVTierTestProcess", .product(name: "Logging", package: "swift-log")]),
        .testTarget(
            name: "KVTierServerTests",
            dependencies: [
                "KVTierServer", "KVTierProtocol", "KVTierSystem", "KVTierCore",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
    ]
)
