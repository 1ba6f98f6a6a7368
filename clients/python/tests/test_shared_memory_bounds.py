"""Finding 4(b) (docs/security.md): shared memory a client can make resident is bounded
and counted. A hostile client writes every byte it can reach through its mappings, inside and
outside any extent; the daemon's memfds must then hold no more than the tenant's staging arena
(committed in full at HELLO) plus the pages it stored."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import kvtier
from _child import MODEL, kv, tokens  # noqa: E402  (tests/ is on sys.path under pytest)

STAGING = 16 << 20
WRITE = 64 << 20  # what the hostile client tries to make resident


def arena_bytes(pid: int) -> int:
    """Bytes committed to the daemon's arena memfds (st_blocks, whoever touched them)."""
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if os.readlink(path).startswith("/memfd:kvtier-arena"):
                total += os.stat(path).st_blocks * 512
        except OSError:
            pass
    return total


def test_client_writes_cannot_grow_the_daemons_shared_memory(start_daemon, tmp_path):
    config = tmp_path / "kvtierd.json"
    config.write_text(json.dumps({"stagingSize": "16MiB"}))
    d = start_daemon("--config", str(config), "--ram-budget", "64MiB")
    with kvtier.Client(d.socket) as c:
        assert c.shared_memory, c.shared_memory_unavailable_reason
        k, v = kv(64, 5)
        assert c.put(MODEL, tokens(64), k, v) == 64
        stored = arena_bytes(d.proc.pid)
        # Every writable byte this client can reach, extents or not.
        writable = getattr(c, "_staging", None) or c._mm
        reach = min(WRITE, len(writable))
        np.frombuffer(writable, dtype=np.uint8, count=reach)[:] = 0x5A
        with pytest.raises(TypeError):
            c._mm[0:4096] = b"\x5a" * 4096  # the page arena is read-only
        after = arena_bytes(d.proc.pid)
        print(f"arena memfds: {stored} bytes after the put, {after} after the client wrote {reach} bytes")
        # Staging is committed as clients write it (lazily), so the writes may grow it up to
        # its limit and not a byte further, whatever the client wrote (WRITE is 4x the limit).
        assert after - stored <= STAGING, "a client's writes grew the daemon's shared memory past stagingSize"
        assert after <= STAGING + (8 << 20), f"{after} bytes: more than the staging limit plus the pages stored"
        keys, values = c.get(MODEL, tokens(64))
        assert np.array_equal(keys, k) and np.array_equal(values, v), "the stored pages are unchanged"
        # Staging beyond the limit is refused, naming it (a size no arena of this tenant could
        # ever hold is an invalid argument, not a budget to wait for).
        with pytest.raises(kvtier.KVTierError) as refused:
            c.alloc([STAGING + 4096])
        assert refused.value.code == "invalidArgument" and "stagingSize" in refused.value.message
