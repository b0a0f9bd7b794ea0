// swift-tools-version:6.0
import PackageDescription

/// StageFS: a POSIX file system for HPC and AI clusters.
/// One module per layer (see README "Architecture"); C is confined to the `C*` shim modules.
let package = Package(
    name: "StageFS",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "stagefs", targets: ["stagefs"])
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        // The logging API (our handler writes the lines; see StageFSCore/Log.swift).
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        // The metrics API the layers count through, and its Prometheus backend (`Telemetry`).
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        .systemLibrary(name: "CFuse3", path: "Sources/CFuse3"),
        .systemLibrary(name: "COpenSSL", path: "Sources/COpenSSL"),
        .systemLibrary(name: "CCurl", path: "Sources/CCurl"),
        .systemLibrary(name: "CSQLite3", path: "Sources/CSQLite3"),
        .systemLibrary(name: "CChecksum", path: "Sources/CChecksum"),
        .systemLibrary(name: "CLinux", path: "Sources/CLinux"),
        .systemLibrary(name: "CMunge", path: "Sources/CMunge"),
        .systemLibrary(name: "CZstd", path: "Sources/CZstd"),
        .systemLibrary(name: "CZlib", path: "Sources/CZlib"),
        .systemLibrary(name: "CLZ4", path: "Sources/CLZ4"),
        .target(name: "StageFSCore", dependencies: ["CChecksum", "CLinux", .product(name: "Logging", package: "swift-log")], exclude: ["README.md"]),
        .target(name: "SQLiteKit", dependencies: ["StageFSCore", "CSQLite3"], exclude: ["README.md"]),
        // The Redis wire client (RESP, TLS, Sentinel, Cluster, the pool and its retries); no file-system rules.
        .target(
            name: "RedisWire", dependencies: ["StageFSCore", "COpenSSL", .product(name: "CoreMetrics", package: "swift-metrics")],
            exclude: ["README.md"]),
        .target(
            name: "Metadata",
            dependencies: ["StageFSCore", "SQLiteKit", "CSQLite3", "RedisWire", .product(name: "CoreMetrics", package: "swift-metrics")],
            exclude: ["README.md"]),
        // Compression: gzip and zstd streams (metadata dumps), LZ4 and zstd blocks (data).
        .target(name: "Compress", dependencies: ["StageFSCore", "CZstd", "CZlib", "CLZ4"], exclude: ["README.md"]),
        .target(name: "ObjectStorage", dependencies: ["StageFSCore", "CCurl", "COpenSSL"], exclude: ["README.md"]),
        // The data path talks to the object store only; slice commits come from the VFS layer.
        .target(
            name: "DataPath",
            dependencies: ["StageFSCore", "ObjectStorage", "SQLiteKit", "Compress", .product(name: "CoreMetrics", package: "swift-metrics")],
            exclude: ["README.md"]),
        .target(name: "VFS", dependencies: ["StageFSCore", "Metadata", "DataPath"], exclude: ["README.md"]),
        .target(
            name: "FUSEMount", dependencies: ["StageFSCore", "VFS", "CFuse3", .product(name: "CoreMetrics", package: "swift-metrics")],
            exclude: ["README.md"]),
        // MUNGE credentials for the gateway's TCP connections.
        .target(name: "MungeAuth", dependencies: ["StageFSCore", "CMunge"], exclude: ["README.md"]),
        // The multi-tenant gateway (server) and the engine and store of a client that talks to one.
        .target(
            name: "Gateway",
            dependencies: [
                "StageFSCore", "Metadata", "ObjectStorage", "DataPath", "MungeAuth", "Compress",
                .product(name: "CoreMetrics", package: "swift-metrics"),
            ], exclude: ["README.md"]),
        .target(
            name: "Staging",
            dependencies: [
                "StageFSCore", "Metadata", "ObjectStorage", "DataPath", "Compress", .product(name: "CoreMetrics", package: "swift-metrics"),
            ], exclude: ["README.md"]),
        // Metrics: the Prometheus registry, its exposition over HTTP and a Unix socket, and the
        // reading of it for `stagefs stats`.
        .target(
            name: "Telemetry",
            dependencies: [
                "StageFSCore", .product(name: "CoreMetrics", package: "swift-metrics"), .product(name: "Prometheus", package: "swift-prometheus"),
            ], exclude: ["README.md"]),
        .executableTarget(
            name: "stagefs",
            dependencies: [
                "StageFSCore", "Metadata", "ObjectStorage", "DataPath", "VFS", "FUSEMount", "Staging", "Gateway", "Compress", "Telemetry",
                .product(name: "ArgumentParser", package: "swift-argument-parser"), .product(name: "CoreMetrics", package: "swift-metrics"),
            ],
            exclude: ["README.md"]
        ),
        .testTarget(
            name: "StageFSTests",
            dependencies: [
                "StageFSCore", "SQLiteKit", "Metadata", "ObjectStorage", "DataPath", "VFS", "Staging", "Gateway", "MungeAuth", "Compress",
                "Telemetry",
                .product(name: "CoreMetrics", package: "swift-metrics"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
