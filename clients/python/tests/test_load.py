"""The RAM budget holds while several client processes put and get at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

import kvtier

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

# One worker process: PUTs `rounds` distinct 64-token sequences (4 pages of 8 KiB each) and GETs
# an earlier one back after each, checking its bytes.
WORKER = r"""
import json, sys
import numpy as np
import kvtier
sock, worker, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = kvtier.ModelSpec("pytest-load", layers=2, kv_heads=2, head_dim=32, page_tokens=16)
def kv(seq):
    rng = np.random.default_rng(seq)
    shape = (2, 64, 2, 32)
    return rng.standard_normal(shape).astype(np.float16), rng.standard_normal(shape).astype(np.float16)
def toks(seq):
    return [seq * 1000 + i for i in range(64)]
bad = 0
with kvtier.Client(sock) as c:
    for r in range(rounds):
        seq = worker * 10000 + r
        k, v = kv(seq)
        c.put(model, toks(seq), k, v)
        old = worker * 10000 + r // 2
        keys, values = c.get(model, toks(old))
        ek, ev = kv(old)
        n = keys.shape[1]
        if n != 64 or not (np.array_equal(keys, ek[:, :n]) and np.array_equal(values, ev[:, :n])):
            bad += 1
            wrong = [] if n == 0 else [int(t) for t in range(n) if not (np.array_equal(keys[:, t], ek[:, t]) and np.array_equal(values[:, t], ev[:, t]))]
            zero = bool(wrong) and not keys[:, wrong[0]].any()
            print("round", r, "sequence", old, "served", n, "wrong tokens", wrong[:5], len(wrong), "zeros" if zero else "",
                  c.lookup_detail(model, toks(old)), file=sys.stderr)
print(json.dumps({"bad": bad}))
"""

PAGE = 16 * 2 * 2 * 2 * 32 * 2  # bytes of one page of the load model
BUDGET = 64 * PAGE  # 512 KiB: far less than the 4 x 60 x 4 pages the workers write


def test_ram_budget_holds_under_concurrent_load(start_daemon):
    d = start_daemon("--ram-budget", str(BUDGET), "--disk-codec", "fp16+lz4")
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC))
    workers, rounds = 4, 60
    peak = [0]
    done = threading.Event()

    def monitor():
        with kvtier.Client(d.socket) as c:
            while not done.is_set():
                peak[0] = max(peak[0], c.status()["ram_bytes"])
                time.sleep(0.002)

    watcher = threading.Thread(target=monitor)
    watcher.start()
    try:
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, d.socket, str(w), str(rounds)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(workers)]
        results = []
        for p in procs:
            out, err = p.communicate(timeout=240)
            assert p.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]) | {"log": err[-2000:]})
    finally:
        done.set()
        watcher.join()
    assert all(r["bad"] == 0 for r in results), results
    with kvtier.Client(d.socket) as c:
        status = c.status()
    # While requests run, each may hold one put's new pages and one get's leased pages above
    # the budget before eviction catches up; once they end, RAM is within the budget.
    assert peak[0] <= BUDGET + workers * 8 * PAGE, (peak[0], BUDGET)
    assert status["ram_bytes"] <= BUDGET, status
    assert status["evictions"] > 0 and status["disk_pages"] >= workers * rounds * 4 - BUDGET // PAGE, status
    assert status["leases"] == 0, status
