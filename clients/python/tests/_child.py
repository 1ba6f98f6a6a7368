"""A second client process for the tests: ``python _child.py MODE SOCKET [ARGS...]``.

Modes print one JSON line on stdout:
- put SOCKET N SEED: registers the test model, puts N tokens of seeded KV, prints put_detail.
- lookup SOCKET N: prints the lookup of tokens 0..N.
- alloc-and-wait SOCKET: ALLOCs staging extents, writes into them, prints "allocated" and
  sleeps (the test SIGKILLs it before it sends PUT).
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import numpy as np  # noqa: E402

import kvtier  # noqa: E402

MODEL = kvtier.ModelSpec("pytest-tiny", layers=2, kv_heads=2, head_dim=32, page_tokens=16)


def kv(n, seed):
    rng = np.random.default_rng(seed)
    shape = (MODEL.layers, n, MODEL.kv_heads, MODEL.head_dim)
    return rng.standard_normal(shape).astype(np.float16), rng.standard_normal(shape).astype(np.float16)


def tokens(n):
    return list(range(1000, 1000 + n))


def main():
    mode, sock = sys.argv[1], sys.argv[2]
    with kvtier.Client(sock) as c:
        if mode == "put":
            n, seed = int(sys.argv[3]), int(sys.argv[4])
            k, v = kv(n, seed)
            r = c.put_detail(MODEL, tokens(n), k, v)
            print(json.dumps({"cached": r.cached_tokens, "new_pages": r.new_pages, "sent": r.sent_tokens}), flush=True)
        elif mode == "lookup":
            n = int(sys.argv[3])
            print(json.dumps({"cached": c.lookup(MODEL, tokens(n)), "tenant": c.tenant, "uid": os.getuid()}), flush=True)
        elif mode == "alloc-and-wait":
            lease, extents = c.alloc([MODEL.bytes_per_token * MODEL.page_tokens] * 4)
            for e in extents:
                np.frombuffer(c._staging, dtype=np.uint8, count=e.bytes, offset=e.offset)[:] = 7
            print(json.dumps({"allocated": len(extents), "lease": lease}), flush=True)
            time.sleep(60)
        else:
            raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
