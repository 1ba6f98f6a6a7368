"""One turn of a conversation with the fixture model, in its own process, KV through kvtierd:

    python _tinyllama_turn.py FIXTURE_DIR SOCKET TEXT_FILE TOKENS OUT_DIR [--recompute]

Takes the first TOKENS bytes of TEXT_FILE as the conversation so far (the model is byte level),
restores the longest cached prefix from kvtierd with ``kvtier.PrefixCache``, computes only the
tokens after it with ``tinyllama.forward(..., past=...)``, and writes the whole conversation's KV
back (``durable``, so it survives a daemon restart). Saves the new tokens' logits to
OUT_DIR/logits.npy; with ``--recompute`` also times a full forward pass over all TOKENS and saves
its logits to OUT_DIR/full-logits.npy. The KV it restored and the KV it put (float16) go to
OUT_DIR/restored-{keys,values}.npy and OUT_DIR/put-{keys,values}.npy. ``--repeats N`` times both forward passes N times more,
alternating, and reports their medians too (the restore itself is timed once: a second get would
be served from RAM). Prints one JSON line.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import numpy as np  # noqa: E402

import kvtier  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("fixture_dir")
    ap.add_argument("socket")
    ap.add_argument("text")
    ap.add_argument("tokens", type=int)
    ap.add_argument("out")
    ap.add_argument("--recompute", action="store_true")
    ap.add_argument("--repeats", type=int, default=0)
    args = ap.parse_args()

    sys.path.insert(0, args.fixture_dir)
    import tinyllama

    model = tinyllama.load(args.fixture_dir)
    cfg = model[0]
    spec = kvtier.ModelSpec("tinyllama-fixture", layers=cfg["layers"], kv_heads=cfg["kv_heads"],
                            head_dim=cfg["head_dim"], rope_theta=cfg["theta"])
    with open(args.text, "rb") as f:
        tokens = list(f.read()[: args.tokens])
    report = {}
    tinyllama.forward(model, tokens[:64])  # warm-up: BLAS threads and first-touch memory out of the timings
    with kvtier.Client(args.socket) as client:
        cache = kvtier.PrefixCache(client, spec, durable=True)
        start, start_cpu = time.perf_counter(), time.process_time()
        keys, values = cache.restore(tokens)
        restored = keys.shape[1]
        past = [(keys[layer], values[layer]) for layer in range(spec.layers)] if restored else None
        present = []
        computed, computed_cpu = time.perf_counter(), time.process_time()
        logits = tinyllama.forward(model, tokens[restored:], past=past, present=present)
        done, done_cpu = time.perf_counter(), time.process_time()
        all_keys = np.stack([np.concatenate([keys[layer], k.astype(np.float16)]) for layer, (k, _) in enumerate(present)])
        all_values = np.stack([np.concatenate([values[layer], v.astype(np.float16)]) for layer, (_, v) in enumerate(present)])
        cached = cache.save(tokens, all_keys, all_values)
        look = cache.last_lookup
        report.update(tokens=len(tokens), restored=restored, lookup_cached=look.cached_tokens,
                      lookup_ram=look.ram_tokens, lookup_disk=look.disk_tokens,
                      restore_s=cache.restore_seconds, compute_s=done - computed, ttft_s=done - start,
                      restore_cpu_s=computed_cpu - start_cpu, compute_cpu_s=done_cpu - computed_cpu,
                      cached_after=cached, put_sent=cache.last_put.sent_tokens,
                      put_new_pages=cache.last_put.new_pages)
    np.save(os.path.join(args.out, "logits.npy"), logits)
    # The bytes themselves, so a test can prove a lossless codec on bits rather than on logits.
    np.save(os.path.join(args.out, "restored-keys.npy"), keys)
    np.save(os.path.join(args.out, "restored-values.npy"), values)
    np.save(os.path.join(args.out, "put-keys.npy"), all_keys)
    np.save(os.path.join(args.out, "put-values.npy"), all_values)
    if args.recompute:
        start, start_cpu = time.perf_counter(), time.process_time()
        full = tinyllama.forward(model, tokens)
        report["recompute_s"] = time.perf_counter() - start
        report["recompute_cpu_s"] = time.process_time() - start_cpu
        np.save(os.path.join(args.out, "full-logits.npy"), full)
        if args.repeats:
            new_s, full_s, new_cpu, full_cpu = [], [], [], []
            for _ in range(args.repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                tinyllama.forward(model, tokens[restored:], past=past)
                new_s.append(time.perf_counter() - start)
                new_cpu.append(time.process_time() - start_cpu)
                start, start_cpu = time.perf_counter(), time.process_time()
                tinyllama.forward(model, tokens)
                full_s.append(time.perf_counter() - start)
                full_cpu.append(time.process_time() - start_cpu)
            report.update(repeats=args.repeats, compute_median_s=statistics.median(new_s),
                          recompute_median_s=statistics.median(full_s),
                          compute_cpu_median_s=statistics.median(new_cpu),
                          recompute_cpu_median_s=statistics.median(full_cpu))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
