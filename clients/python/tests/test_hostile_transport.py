"""Hostile clients against a real kvtierd's transport: stalled large frames must not grow the
daemon's memory past its frame budget, and the memory must come back when they are gone."""

from __future__ import annotations

import json
import os
import socket
import struct
import tempfile
import threading
import time

import pytest

from conftest import Daemon, daemon_binary
from kvtier import _wire

MIB = 1 << 20
BUDGET = 160 * MIB  # maxBufferedFrameBytes (and per uid): room for two whole 64 MiB frames
SLACK = 48 * MIB  # receive buffers, thread stacks, allocator rounding
STALLED = 12


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def read_frame(s: socket.socket) -> bytes:
    data = b""
    while len(data) < 16 or len(data) < 16 + struct.unpack("<I", data[:4])[0]:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    return data


def stalled_put(path: str, body: bytes, outcome: list) -> None:
    """HELLO, then a 64 MiB inline PUT of which only `body` is sent; records the server's
    answer (it cuts the frame at its timeout, or refuses it room)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(120)
    try:
        s.connect(path)
        s.sendall(_wire.frame(_wire.Op.HELLO, 1, _wire.hello_request(False, "stall")))
        read_frame(s)
        s.sendall(struct.pack("<IHHII", 64 * MIB, _wire.Op.PUT, 0, 2, 0) + body)
        reply = read_frame(s)
        outcome.append(reply[20:].decode(errors="replace") if len(reply) > 20 else "closed")
    except OSError as e:
        outcome.append(f"error {e}")
    finally:
        s.close()


def test_stalled_inline_frames_stay_within_the_frame_budget():
    binary = daemon_binary()
    if binary is None:
        pytest.skip("kvtierd is not built")
    config_dir = tempfile.mkdtemp(prefix="kvtier-budget-")
    config = os.path.join(config_dir, "kvtierd.json")
    with open(config, "w") as f:
        json.dump({"maxBufferedFrameBytes": "160MiB", "maxBufferedFrameBytesPerUID": "160MiB"}, f)
    d = Daemon(binary, "--config", config, "--ram-budget", "16MiB")
    try:
        baseline = rss_bytes(d.proc.pid)
        body = b"\x01" * (60 * MIB)
        outcomes: list = []
        threads = [threading.Thread(target=stalled_put, args=(d.socket, body, outcomes)) for _ in range(STALLED)]
        for t in threads:
            t.start()
        # A measurement, not a wait for a condition: sample RSS until every stalled client was cut.
        peak = baseline
        while any(t.is_alive() for t in threads):
            peak = max(peak, rss_bytes(d.proc.pid))
            time.sleep(0.05)
        for t in threads:
            t.join()
        after = rss_bytes(d.proc.pid)
        grown = (peak - baseline) // MIB
        assert peak - baseline <= BUDGET + SLACK, \
            f"{STALLED} stalled 64 MiB frames grew RSS by {grown} MiB; the frame budget is {BUDGET // MIB} MiB"
        assert peak - baseline >= 60 * MIB, f"the check can fail: an admitted frame's 60 MiB showed ({grown} MiB)"
        assert after - baseline <= SLACK, f"RSS stayed {(after - baseline) // MIB} MiB above its start after the clients left"
        print(f"RSS start {baseline // MIB} MiB, peak +{grown} MiB, after +{(after - baseline) // MIB} MiB")
        # Admitted frames are cut at the frame timeout with a reply; a sender still blocked
        # sending (its frame never admitted) sees the connection end instead of the reply.
        assert len(outcomes) == STALLED
        assert all("frameTimeout" in o or "longer than" in o or o.startswith("error") or o == "closed" for o in outcomes), outcomes
    finally:
        d.stop()
        os.unlink(config)
        os.rmdir(config_dir)
