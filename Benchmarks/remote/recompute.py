#!/usr/bin/env python3
"""Recompute baseline of `kvtier bench remote`: how long the fixture model (tinyllama, NumPy
reference forward pass) takes to prefill a prefix of N tokens, the KV that the remote and disk
tiers restore instead.

A prefix of 512 MiB of its KV is 87,296 tokens (6 KiB per token), far too long to prefill here in
a reasonable time, so this measures chunked prefill (chunks of --chunk tokens, each attending to
the KV of all earlier chunks, as an engine prefills a long prompt) over the first --measure tokens,
fits each chunk's time as a + b * context (least squares: a is the chunk's own work, b its
attention over earlier tokens, which grows linearly with the context), and projects the sum over
all chunks of the full prefix. It also prints a lower bound that does not depend on the fit: the
fastest chunk measured times the number of chunks (every chunk does at least that work). Tokens are bytes of Benchmarks/data/heldout-prose.txt, repeated.

  python3 Benchmarks/remote/recompute.py --tokens 87296 --measure 8192 --json
"""
import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.environ.get("KVTIER_FIXTURES", os.path.join(ROOT, "..", "shared", "fixtures"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=87_296, help="prefix length to project (default: 512 MiB of KV)")
    parser.add_argument("--measure", type=int, default=8192, help="tokens actually prefilled and timed")
    parser.add_argument("--chunk", type=int, default=1024, help="tokens per prefill chunk")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    folder = os.path.join(FIXTURES, "tinyllama")
    if not os.path.exists(os.path.join(folder, "tinyllama.py")):
        sys.exit(f"the fixture model is not at {folder} (set KVTIER_FIXTURES): nothing to measure")
    sys.path.insert(0, folder)
    import tinyllama

    model = tinyllama.load(folder)
    cfg = model[0]
    text = open(os.path.join(ROOT, "Benchmarks", "data", "heldout-prose.txt"), "rb").read()
    tokens = list((text * (args.measure // len(text) + 1))[: args.measure])
    # One small pass first: the first touch of the weights and NumPy's set-up are not prefill.
    tinyllama.forward(model, tokens[:64])
    past, points = None, []
    for start in range(0, args.measure, args.chunk):
        chunk = tokens[start : start + args.chunk]
        present = []
        began = time.perf_counter()
        tinyllama.forward(model, chunk, past=past, present=present)
        points.append((start, time.perf_counter() - began))
        # The cache as an engine keeps it: float16, appended.
        layer_kv = [(k.astype(np.float16), v.astype(np.float16)) for k, v in present]
        past = layer_kv if past is None else [(np.concatenate([pk, k]), np.concatenate([pv, v])) for (pk, pv), (k, v) in zip(past, layer_kv)]
    contexts = np.array([p for p, _ in points], dtype=np.float64)
    seconds = np.array([s for _, s in points], dtype=np.float64)
    b, a = np.polyfit(contexts, seconds, 1) if len(points) > 1 else (0.0, seconds[0])
    chunks = [(start, min(args.chunk, args.tokens - start)) for start in range(0, args.tokens, args.chunk)]
    projected = sum((a + b * start) * size / args.chunk for start, size in chunks)
    # Every chunk does at least the first one's work (the same tokens, and attention over more):
    # the fastest chunk measured, times the chunks, bounds the recompute from below.
    lower = sum(float(seconds.min()) * size / args.chunk for _, size in chunks)
    kv_bytes_per_token = cfg["layers"] * 2 * cfg["kv_heads"] * cfg["head_dim"] * 2
    report = {
        "model": "tinyllama (fixture, NumPy reference forward pass)",
        "tokens": args.tokens, "kv_bytes": args.tokens * kv_bytes_per_token, "chunk": args.chunk,
        "measured_tokens": args.measure, "measured_seconds": float(seconds.sum()),
        "chunk_seconds": [{"context": int(p), "seconds": round(s, 4)} for p, s in points],
        "fit_seconds_per_chunk": float(a), "fit_seconds_per_context_token": float(b),
        "projected_seconds": float(projected), "lower_bound_seconds": float(lower),
        "numpy_threads": os.environ.get("OMP_NUM_THREADS", "default"),
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"prefill of {args.measure} tokens measured in {seconds.sum():.1f} s (chunks of {args.chunk}); "
              f"fit: {a:.3f} s per chunk + {b * 1e6:.2f} us per token of context")
        print(f"recompute of {args.tokens} tokens ({args.tokens * kv_bytes_per_token / 2**20:.0f} MiB of KV): "
              f"{projected:.1f} s projected, at least {lower:.1f} s")


if __name__ == "__main__":
    main()
