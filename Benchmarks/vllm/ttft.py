"""Time to first token of vLLM with and without KVTier, on SmolLM2-135M-Instruct.

    KVTIER_VLLM_PYTHON=$(Benchmarks/vllm/setup-venv) \
        python3 Benchmarks/vllm/ttft.py [--daemon .build/release/kvtierd] [--sizes 1024,2048,3584] \
        [--repeat 3] [--json out.json]

Two engines, one after the other (two cores cannot run both fairly), both with vLLM's own
prefix cache off, so every restored token comes from kvtierd:

- plain vLLM: TTFT of fresh prompts (the recompute baseline, measured in the same run);
- vLLM with KVTierConnector: TTFT of fresh prompts (a miss: the connector's overhead is the
  difference to plain), of the same prompts again (a RAM hit), and again after
  ``EVICT`` moved every page to disk (a disk hit).

TTFT is the time of a one-token greedy request. Each figure is the median of ``--repeat``
prompts of each size. A prompt of n tokens restores n - 1 rounded down to vLLM's block (128).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "clients" / "python" / "src"))

import harness  # noqa: E402
import kvtier  # noqa: E402


BLOCK, PAGE = 128, 256  # vLLM's CPU block; the connector's default page (two blocks)


def start_daemon(binary: str, work: str) -> subprocess.Popen:
    sock = os.path.join(work, "s.sock")
    proc = subprocess.Popen([binary, "--socket", sock, "--state-dir", os.path.join(work, "state"), "--ram-budget", "4GiB",
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "kvtierd.log"), "w"))
    deadline = time.monotonic() + 120
    while True:  # the socket appears once it listens; a client's connect is the event we wait for
        try:
            with kvtier.Client(sock, shared_memory=False) as c:
                c.ping()
            return proc
        except kvtier.KVTierConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("kvtierd did not start")
            time.sleep(0.05)


def median(xs):
    return statistics.median(xs) if xs else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--daemon", default=str(HERE.parents[1] / ".build" / "release" / "kvtierd"))
    ap.add_argument("--sizes", default="1024,2048,3584")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    try:
        python = harness.vllm_python()
        model = harness.prepared_model(python)
    except harness.Unavailable as e:
        print(f"ttft: {e}", file=sys.stderr)
        return 2

    work = tempfile.mkdtemp(prefix="kvtier-ttft-")
    daemon = start_daemon(args.daemon, work)
    sock = os.path.join(work, "s.sock")
    result = {"model": "SmolLM2-135M-Instruct (bf16)", "sizes": sizes, "repeat": args.repeat, "cpus": os.cpu_count(),
              "plain": {}, "miss": {}, "ram_hit": {}, "disk_hit": {}, "restored_tokens": {}}
    seed = 100
    stored_pages = 0
    try:
        plain = harness.EngineProcess(python, model, None, name="plain", log_dir=work, prefix_caching=False).wait_ready()
        plain.generate(harness.prompt(64, 1), max_tokens=1)  # warm-up
        for n in sizes:
            times = []
            for r in range(args.repeat):
                seed += 1
                times.append(plain.generate(harness.prompt(n, seed), max_tokens=1)["seconds"])
            result["plain"][n] = median(times)
            print(f"plain {n}: {result['plain'][n]:.3f} s", flush=True)
        plain.close()

        eng = harness.EngineProcess(python, model, sock, name="kvtier", log_dir=work, prefix_caching=False).wait_ready()
        eng.generate(harness.prompt(64, 2), max_tokens=1)
        for n in sizes:
            prompts = []
            miss, ram, disk = [], [], []
            for r in range(args.repeat):
                seed += 1
                p = harness.prompt(n, seed)
                prompts.append(p)
                out = eng.generate(p, max_tokens=1)
                assert out["cached"] == 0, out
                miss.append(out["seconds"])
            # Saves are asynchronous: wait until the daemon holds every page of these prompts.
            stored_pages += args.repeat * -(-(n - n % BLOCK) // PAGE)
            with kvtier.Client(sock) as c:
                deadline = time.monotonic() + 300
                while c.pages(limit=1)[0] < stored_pages:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"kvtierd holds {c.pages(limit=1)[0]} pages, not {stored_pages}")
                    time.sleep(0.05)
            for p in prompts:
                out = eng.generate(p, max_tokens=1)
                ram.append(out["seconds"])
            with kvtier.Client(sock) as c:
                c.evict()
            for p in prompts:
                out = eng.generate(p, max_tokens=1)
                disk.append(out["seconds"])
                with kvtier.Client(sock) as c:
                    c.evict()
            result["miss"][n], result["ram_hit"][n], result["disk_hit"][n] = median(miss), median(ram), median(disk)
            # vLLM reports num_cached_tokens only with its own prefix cache on, so the restored
            # count is the connector's rule: n - 1 cut to the block (checked in test_vllm.py).
            result["restored_tokens"][n] = (n - 1) // BLOCK * BLOCK
            print(f"kvtier {n}: miss {result['miss'][n]:.3f} s, RAM hit {result['ram_hit'][n]:.3f} s, "
                  f"disk hit {result['disk_hit'][n]:.3f} s", flush=True)
        eng.close()
    finally:
        daemon.terminate()
        daemon.wait(60)

    lines = ["| prompt tokens | plain vLLM | KVTier miss | overhead | RAM hit | ratio | disk hit | ratio |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n in sizes:
        p, m, r, d = (result[k][n] for k in ("plain", "miss", "ram_hit", "disk_hit"))
        lines.append(f"| {n} | {p * 1000:.0f} ms | {m * 1000:.0f} ms | {(m - p) * 1000:+.0f} ms | {r * 1000:.0f} ms | "
                     f"{r / p:.2f}× | {d * 1000:.0f} ms | {d / p:.2f}× |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
