"""Finding 11 (docs/security.md): the client never maps an arena descriptor a daemon could
cut short or other processes could write. A fake daemon (a small socket server in this process)
answers HELLO with memfds lacking seals, then shrinks them: the client must refuse to map them,
say why, go on inline, and never die of SIGBUS."""

from __future__ import annotations

import array
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading

import pytest

from kvtier import _wire

SEAL_SHRINK, SEAL_GROW, SEAL_FUTURE_WRITE = 0x2, 0x4, 0x10
ARENA = 1 << 20

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="needs os.memfd_create (Linux)")


def memfd(name: str, seals: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, ARENA)
    if seals:
        import fcntl
        fcntl.fcntl(fd, getattr(fcntl, "F_ADD_SEALS", 1033), seals)
    return fd


class FakeDaemon:
    """Answers one HELLO with `fds` and the arena sizes, then waits for `shrink` to cut every
    unsealed memfd to nothing (what a hostile daemon would do under a client's mapping)."""

    def __init__(self, fds):
        self.fds = fds
        self.dir = tempfile.mkdtemp(prefix="kvtier-fake-")
        self.path = os.path.join(self.dir, "s.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.conn = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.listener.accept()
        self.conn = conn
        head = conn.recv(_wire.HEADER_BYTES, socket.MSG_WAITALL)
        length, _op, _flags, rid, _status = _wire.HEADER.unpack(head)
        if length:
            conn.recv(length, socket.MSG_WAITALL)
        body = (_wire.u16(_wire.PROTOCOL_VERSION) + _wire.u32(os.getuid()) + _wire.u32(_wire.CAP_SHARED_MEMORY)
                + _wire.u32(_wire.MAX_CONTROL_BODY) + _wire.u32(_wire.MAX_INLINE_BODY) + _wire.u32(_wire.MAX_TOKENS_PER_REQUEST)
                + _wire.u64(ARENA) + _wire.u64(ARENA))
        header = _wire.HEADER.pack(len(body), _wire.Op.HELLO, _wire.FLAG_REPLY | _wire.FLAG_FDS, rid, 0)
        conn.sendmsg([header + body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self.fds))])

    def shrink(self):
        for fd in self.fds:
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass  # sealed: cannot shrink, as it should be

    def close(self):
        if self.conn is not None:
            self.conn.close()
        self.listener.close()
        for fd in self.fds:
            os.close(fd)
        os.unlink(self.path)
        os.rmdir(self.dir)


CASES = {
    "no seals at all": (0, 0),
    "page arena without F_SEAL_FUTURE_WRITE": (SEAL_SHRINK | SEAL_GROW, SEAL_SHRINK | SEAL_GROW),
    "staging arena without F_SEAL_SHRINK": (SEAL_SHRINK | SEAL_GROW | SEAL_FUTURE_WRITE, 0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_unsealed_arenas_are_refused(case):
    import kvtier
    page_seals, staging_seals = CASES[case]
    fake = FakeDaemon([memfd("fake-pages", page_seals), memfd("fake-staging", staging_seals)])
    try:
        with pytest.warns(RuntimeWarning, match="seal"):
            client = kvtier.Client(fake.path, timeout=10)
        assert not client.shared_memory, f"{case}: the client mapped an arena it cannot trust"
        reason = client.shared_memory_unavailable_reason or ""
        assert "F_SEAL" in reason, reason
        fake.shrink()
        client.close()
    finally:
        fake.close()


def test_a_shrunk_arena_does_not_kill_the_client():
    """The same in a child process, touching whatever it mapped after the shrink: before the
    fix the client mapped the unsealed memfd and died of SIGBUS here."""
    script = textwrap.dedent(f"""
        import os, sys, warnings
        sys.path.insert(0, {os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'src')!r})
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        warnings.simplefilter("ignore")
        import kvtier
        from test_arena_seals import FakeDaemon, memfd
        fake = FakeDaemon([memfd("fake-pages", 0), memfd("fake-staging", 0)])
        client = kvtier.Client(fake.path, timeout=10)
        fake.shrink()
        for mm in (client._mm, getattr(client, "_staging", None)):
            if mm is not None:
                mm[0]  # SIGBUS on a mapping past the end of its file
        print("alive", client.shared_memory)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"the client died (status {done.returncode}): {done.stderr[-2000:]}"
    assert done.stdout.strip() == "alive False"
