"""A short run of Benchmarks/soak/soak.py against a real kvtierd: 8 client processes of two
tenants (when run as root) put, get, resume, fork, evict and delete for 20 s over a 32 MiB RAM
budget while one is SIGKILLed every 3 s; every byte served must be right, no request may fail
unexpectedly, and the daemon's descriptors and threads must come back down afterwards. The
closing-note figures come from the full run (64 clients, 10 minutes; docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import os

import pytest

from conftest import REPO, daemon_binary

SOAK = os.path.join(REPO, "Benchmarks", "soak", "soak.py")


@pytest.mark.skipif(daemon_binary() is None, reason="kvtierd is not built (swift build)")
def test_short_soak_serves_only_right_bytes():
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    result = soak.soak(daemon_binary(), clients=8, duration=20, seed=0x50A4, kill_every=3,
                       ram_budget="32MiB", disk_budget="512MiB")
    totals = result["totals"]
    print(f"\n[soak] {totals['ops']} ops, {totals['gets']} gets, {totals['bytes_checked']} bytes checked, "
          f"{result['workers_killed']} workers killed, peak {result['peak']}")
    assert result["failure_count"] == 0, result["failures"]
    assert totals["wrong_bytes"] == 0 and totals["unexpected_errors"] == 0
    # The run did real work: pages went to disk and came back, and workers were killed.
    assert totals["gets"] > 100 and totals["bytes_checked"] > 0 and result["workers_killed"] >= 1
    assert result["daemon"]["evictions"] > 0
    assert result["ok"], result
    assert result["daemon_exit"] == 0
