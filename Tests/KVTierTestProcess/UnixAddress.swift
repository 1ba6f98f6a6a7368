@preconcurrency import Glibc

/// A `sockaddr_un` for a socket path, checked to fit (with its terminating zero) in `sun_path`.
public func unixSocketAddress(_ path: String) throws(ProcessFailure) -> sockaddr_un {
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { throw ProcessFailure("socket path too long: \(path)") }
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        raw.copyBytes(from: bytes)
        raw[bytes.count] = 0
    }
    return address
}
