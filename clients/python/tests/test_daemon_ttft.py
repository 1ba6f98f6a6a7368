"""Benchmarks/gpu/daemon_ttft.py and restore_paths.py --smoke: the GPU benchmarks' code paths on
CPU with a tiny shape, so the scripts keep working between GPU loans. Skipped without torch and
transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch", reason="needs torch (scripts/install-deps installs a CPU wheel)")
pytest.importorskip("transformers", reason="needs transformers >= 4.56 (scripts/install-deps)")

from conftest import REPO, daemon_binary  # noqa: E402

SCRIPT = os.path.join(REPO, "Benchmarks", "gpu", "daemon_ttft.py")


def test_smoke(tmp_path):
    binary = daemon_binary()
    if binary is None:
        pytest.skip("kvtierd is not built: run `swift build --product kvtierd`, or set KVTIER_DAEMON")
    out = tmp_path / "ttft.json"
    p = subprocess.run([sys.executable, SCRIPT, "--smoke", "--daemon", binary, "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["tokens"] for r in report["rows"]] == [64, 200]
    for row in report["rows"]:
        assert row["recomputeSeconds"] > 0 and row["kvBytes"] == row["tokens"] * 2 * 2 * 2 * 32 * 2
        # RAM tier: float16 copies of the float32 model's KV; disk tier: k4v4 (4-bit) pages.
        assert 0 < row["ram"]["maxLogitDiff"] < 1e-3
        assert row["ram"]["maxLogitDiff"] < row["disk"]["maxLogitDiff"] < 0.2
        assert row["ram"]["ttftSeconds"] > row["ram"]["restoreSeconds"] > 0
        # VRAM tier (a shared-memory pool on the CPU): the same bytes as the RAM tier's.
        assert row["vram"]["maxLogitDiff"] == row["ram"]["maxLogitDiff"]
        assert row["vram"]["ttftSeconds"] > row["vram"]["restoreSeconds"] > 0
    assert "| 200 |" in p.stdout


def test_restore_paths_smoke(tmp_path):
    """Benchmarks/gpu/restore_paths.py --smoke: every restore path of the GPU benchmark (RAM tier
    pinned and pageable, disk tier, quantized bytes decoded by kvtier.dequant and checked against
    the C decoder, the VRAM tier alone and through kvtierd's directory in a second process, the
    copy floors) on the CPU with a small shape."""
    binary = daemon_binary()
    if binary is None:
        pytest.skip("kvtierd is not built: run `swift build --product kvtierd`, or set KVTIER_DAEMON")
    cli = os.path.join(os.path.dirname(binary), "kvtier")
    if not os.access(cli, os.X_OK):
        pytest.skip(f"no kvtier CLI beside {binary}")
    out = tmp_path / "restore.json"
    script = os.path.join(REPO, "Benchmarks", "gpu", "restore_paths.py")
    p = subprocess.run([sys.executable, script, "--smoke", "--daemon", binary, "--kvtier", cli, "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["kvBytes"] == 512 * 2 * 2 * 2 * 64 * 2
    assert [q["codec"] for q in report["quantized"]] == ["k4v4", "tq4"]
    assert all(q["bitExactLayer0"] for q in report["quantized"])
    assert report["quantized"][0]["ratioToFp16Bytes"] == pytest.approx(3.2)
    for key in ("ramPinned", "ramPageable", "disk", "h2dPinned", "d2d"):
        assert report[key]["seconds"] > 0, key
    assert "| RAM tier, pinned arena |" in p.stdout
    assert report["vram"]["bytesMatch"] and report["vram"]["otherProcess"]["seconds"] > 0
    vram = report["vramDaemon"]
    assert vram["bytesMatch"] and vram["servedTokens"] == 512 and vram["lookupVramTokens"] == 512
    assert vram["childStats"]["restores"] >= 2 and vram["childStats"]["misses"] == 0
