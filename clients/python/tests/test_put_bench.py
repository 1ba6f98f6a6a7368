"""Benchmarks/store/put_bench.py at a tiny size against a real kvtierd: every configuration runs
and reports positive figures (the figures themselves come from full runs, docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import os

import pytest

from conftest import REPO, daemon_binary

PUT_BENCH = os.path.join(REPO, "Benchmarks", "store", "put_bench.py")


def load():
    spec = importlib.util.spec_from_file_location("put_bench", PUT_BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(daemon_binary() is None, reason="kvtierd is not built (swift build)")
def test_put_bench_at_a_tiny_size_reports_every_figure():
    bench = load()
    args = bench.parse(["--daemon", daemon_binary(), "--page-tokens", "16", "--prefix-pages", "4", "--puts", "3",
                        "--full-budget-prefixes", "2", "--durable-pages", "2", "4", "--durable-repetitions", "2"])
    r = bench.Bench(args).run()
    page = 16 * 4096  # 16 tokens of 1 layer × 8 heads × 128 × (keys + values) × fp16
    assert r["pageBytes"] == page and r["prefixBytes"] == 4 * page
    assert [p["configuration"] for p in r["ram"]] == ["fits", "full"]
    for p in r["ram"]:
        assert p["puts"] == 3 and p["bytes"] == 3 * 4 * page
        assert p["gbps"] > 0 and p["numpyCopyGBps"] > 0 and p["vsNumpyCopy"] > 0
        assert 0 < p["p50Millis"] <= p["p99Millis"]
    assert r["ram"][0]["evictions"] == 0, "the 'fits' budget holds every timed put"
    assert r["ram"][1]["evictions"] >= 6, "every put into the full budget evicts older pages"
    assert [p["pages"] for p in r["durable"]] == [2, 4]
    for p in r["durable"]:
        assert p["repetitions"] == 2 and 0 < p["encodedBytes"] < p["pages"] * page  # k4v4 is smaller than fp16
        for key in ("plain", "durable", "session", "writeSync"):
            assert 0 < p[key + "P50Millis"] <= p[key + "P99Millis"]
        assert p["durableVsWriteSync"] > 0 and p["sessionVsWriteSync"] > 0
    assert r["durable"][1]["encodedBytes"] > r["durable"][0]["encodedBytes"]


def test_put_bench_refuses_a_missing_daemon(capsys):
    bench = load()
    with pytest.raises(SystemExit):
        bench.parse(["--daemon", "/nonexistent/kvtierd"])
    assert "no kvtierd" in capsys.readouterr().err
