// swift-tools-version:6.0
import PackageDescription

// Module layout and dependency direction: see docs/architecture.md.
let package = Package(
    name: "KVTier",
    platforms: [.macOS(.v14)],
    products: [
        .library(name: "KVTierCodec", targets: ["KVTierCodec"]),
        .executable(name: "kvtier", targets: ["kvtier"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
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

        .target(name: "KVTierCore"),
        .target(name: "KVTierCodec", dependencies: ["KVTierCore", "CKVTierKernels", "CLZ4", "CZstd"]),
        .target(name: "KVTierTools", dependencies: ["KVTierCore", "KVTierCodec", "CKVTierKernels"]),
        .executableTarget(
            name: "kvtier",
            dependencies: [
                "KVTierCore", "KVTierCodec", "KVTierTools",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),

        .testTarget(name: "KVTierCoreTests", dependencies: ["KVTierCore"]),
        .testTarget(name: "KVTierCodecTests", dependencies: ["KVTierCodec", "KVTierCore", "CKVTierKernels"]),
        .testTarget(name: "KVTierToolsTests", dependencies: ["KVTierTools", "KVTierCodec", "KVTierCore"]),
    ]
)
