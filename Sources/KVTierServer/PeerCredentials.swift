import KVTierSystem
import SystemPackage

/// Who is on the other end of a Unix socket, as the kernel recorded it when the peer connected
/// (`SO_PEERCRED`): it cannot be forged by the peer, and it does not change if the peer later
/// changes its ids or passes the socket on.
public struct PeerCredentials: Sendable, Hashable, CustomStringConvertible {
    /// The peer's process id at connect time (0 when the peer is in another pid namespace the
    /// kernel cannot translate).
    public var pid: Int32
    public var uid: UInt32
    public var gid: UInt32

    public init(pid: Int32, uid: UInt32, gid: UInt32) {
        self.pid = pid
        self.uid = uid
        self.gid = gid
    }

    /// The credentials of the peer of the connected socket `descriptor`.
    public init(ofSocket descriptor: Int32) throws(Errno) {
        let fields = try FileDescriptor(rawValue: descriptor).peerCredentials()
        self.init(pid: fields.pid, uid: fields.uid, gid: fields.gid)
    }

    public var description: String { "pid \(pid) uid \(uid) gid \(gid)" }
}
