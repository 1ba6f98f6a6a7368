#!/usr/bin/env python3
"""A hostile-shaped PUT: N one-token pages, all cached, sent again inline from dataStart 0.

Its cost must grow with N, not N²: the daemon answers it on the connection's thread (a plan
that searched the cached pages once per chunk took 140 ms at N = 16,384, about 36 s at the
request limit). Baseline in the same run: the first PUT of the same pages (a put that stores
them), so the figure is the re-PUT's time over the store's.

    python3 Benchmarks/store/reput_small_pages.py --daemon .build/release/kvtierd 4096 16384
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "clients", "python", "src"))

import kvtier  # noqa: E402
from kvtier import _wire  # noqa: E402
from kvtier.client import Op  # noqa: E402
from kvtier.local_daemon import LocalDaemon, find_daemon  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tokens", type=int, nargs="+", help="pages (one token each) per PUT")
    parser.add_argument("--daemon", default=find_daemon(REPO, builds=("release", "debug")))
    args = parser.parse_args()
    if not args.daemon:
        parser.error("no kvtierd: build it (swift build -c release --product kvtierd) or pass --daemon")
    daemon = LocalDaemon(args.daemon, prefix="kvtier-reput-")
    try:
        with kvtier.Client(daemon.socket, shared_memory=False) as c:
            model = kvtier.ModelSpec("reput", layers=1, kv_heads=1, head_dim=8, page_tokens=1)
            spec, reg = c._spec(model)
            for n in args.tokens:
                tokens = np.arange(1, n + 1, dtype=np.uint32) + np.uint32(n * 7)
                kv = np.zeros((1, n, 1, 8), dtype=np.float16)
                start = time.perf_counter()
                c.put(model, tokens, kv, kv)
                first = time.perf_counter() - start
                data = bytes(n * spec.bytes_per_token)
                head = c._put_request(reg.model_id, _wire.string("", "session"), _wire.PUT_INLINE, tokens, 0)
                start = time.perf_counter()
                c._call(Op.PUT, [head, _wire.u64(len(data)), data])
                again = time.perf_counter() - start
                print(f"{n} one-token pages: first PUT {first * 1e3:.1f} ms, re-PUT of all of them "
                      f"{again * 1e3:.1f} ms ({again / first:.2f}x)")
    finally:
        daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
