"""kvtierd on a full disk: its state directory on an 8 MiB tmpfs. Durable puts fail with a clear
error once the disk is full, the RAM tier keeps serving (non-durable puts and gets), the daemon
stops cleanly, and after a restart every put that was acknowledged as durable reads back exactly.
Needs root to mount the tmpfs; skips with the reason otherwise."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

import kvtier
from conftest import Daemon, daemon_binary
from kvtier.errors import KVTierError

MODEL = kvtier.ModelSpec("disk-full", layers=2, kv_heads=2, head_dim=64, page_tokens=64)
TOKENS = 256  # 4 pages of 64 KiB


def sequence(n: int):
    rng = np.random.default_rng(n)
    tokens = rng.integers(0, 1 << 30, TOKENS, dtype=np.uint32)
    shape = (MODEL.layers, TOKENS, MODEL.kv_heads, MODEL.head_dim)
    return tokens, rng.standard_normal(shape).astype(np.float16), rng.standard_normal(shape).astype(np.float16)


def exact(client, n: int) -> bool:
    tokens, keys, values = sequence(n)
    got_k, got_v = client.get(MODEL, tokens)
    return (got_k.shape[1] == TOKENS and np.array_equal(got_k.view(np.uint16), keys.view(np.uint16))
            and np.array_equal(got_v.view(np.uint16), values.view(np.uint16)))


@pytest.fixture
def tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = tmp_path / "small"
    path.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(path)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    yield str(path)
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_keeps_ram_serving_and_loses_nothing_acknowledged(tmpfs, tmp_path):
    binary = daemon_binary()
    if binary is None:
        pytest.skip("kvtierd is not built")
    # Random fp16 does not compress: each durable put writes ~256 KiB to the 8 MiB file system.
    # (The second --state-dir wins over the fixture's.)
    daemon = Daemon(binary, "--state-dir", os.path.join(tmpfs, "state"), "--ram-budget", "256MiB", "--disk-codec", "fp16+zstd")
    try:
        acknowledged, refusals = [], []
        with kvtier.Client(daemon.socket) as client:
            n = 0
            while len(refusals) < 5 and n < 200:
                tokens, keys, values = sequence(n)
                try:
                    client.put(MODEL, tokens, keys, values, durable=True)
                    acknowledged.append(n)
                except KVTierError as e:
                    refusals.append(e)
                n += 1
            assert refusals, f"{n} durable puts of 256 KiB fit an 8 MiB tmpfs?"
            assert len(acknowledged) >= 5, f"only {len(acknowledged)} durable puts fit before the disk was full"
            for e in refusals:
                assert e.code in ("unavailable", "overBudget"), f"a full disk should be a clear refusal, got {e.code}: {e.message}"
            print(f"\n[disk full] {len(acknowledged)} durable puts acknowledged, then: {refusals[0].code}: {refusals[0].message}")
            # The RAM tier keeps serving: non-durable puts and gets of them work while the disk is full.
            for m in range(1000, 1008):
                tokens, keys, values = sequence(m)
                assert client.put(MODEL, tokens, keys, values) == TOKENS
                assert exact(client, m)
            assert all(exact(client, a) for a in acknowledged)
            client.ping()
        # A clean stop (it tries to write RAM pages to the full disk) and a restart: every
        # acknowledged put comes back from the page files, exactly.
        daemon.restart()
        assert daemon.proc.poll() is None
        with kvtier.Client(daemon.socket) as client:
            status = client.status()
            lost = [a for a in acknowledged if not exact(client, a)]
            assert not lost, f"acknowledged durable puts lost or wrong after the restart: {lost}"
            assert status["ram_pages"] == 0 or status["disk_pages"] >= 4 * len(acknowledged)
    finally:
        daemon.stop()
        assert daemon.proc.returncode == 0, daemon.log_text()
