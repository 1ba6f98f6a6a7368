"""Benchmarks/gpu/daemon_ttft.py --smoke: the GPU TTFT benchmark's code path on CPU with a tiny
model, so the script keeps working between GPU loans. Skipped without torch and transformers."""

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
    assert "| 200 |" in p.stdout
