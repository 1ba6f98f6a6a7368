#!/usr/bin/env python3
"""Where a codec's attention error comes from, on captured q/k/v (capture_kvq.py, or the fixture's
kv/tinyllama-license): the attention error with keys alone, values alone and both round-tripped
(codecs_ref.py), the RMS error of the scores q·kᵀ/√d, how much attention the first token takes
(an attention sink), and the keys-alone error when that token's key is kept exact.

    python3 Benchmarks/quality/analyze_kvq.py --capture smollm2=/tmp/kvq-smollm2 \
        --capture tinyllama=../shared/fixtures/kv/tinyllama-license --json

Causal attention over every `--stride`-th query position counted back from the last (as
`kvtier codec advise` samples them), float32, query head h reading KV head h // (qHeads/kvHeads).
Errors are ‖ΔO‖/‖O‖ over all sampled positions, heads and layers.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import codecs_ref  # noqa: E402


def load(folder: str):
    """The capture's layers, in order: [(q, k, v)] as float32, [T, heads, d]."""
    count = len(glob.glob(os.path.join(folder, "k_*.npy")))
    if count == 0:
        raise SystemExit(f"analyze_kvq: no k_L.npy files in {folder}")
    return [tuple(np.load(os.path.join(folder, f"{n}_{layer}.npy")).astype(np.float32) for n in "qkv")
            for layer in range(count)]


def attention(q, k, v, positions):
    """Causal softmax(q kᵀ/√d) v at `positions`: (outputs [P, Hq, d], weights [Hq, P, T], scores)."""
    tokens, q_heads, d = q.shape
    group = q_heads // k.shape[1]
    kk = np.repeat(k, group, axis=1)
    vv = np.repeat(v, group, axis=1)
    scores = np.einsum("phd,thd->hpt", q[positions], kk) / np.sqrt(d)
    future = np.arange(tokens)[None, :] > np.asarray(positions)[:, None]
    scores = np.where(future[None], -np.inf, scores)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("hpt,thd->phd", weights, vv), weights, scores


def analyze(layers, codecs, stride: int, page_tokens: int):
    tokens = layers[0][0].shape[0]
    positions = list(range(tokens - 1, -1, -stride))[::-1]
    sums = {}  # (codec, variant) -> [squared error, squared norm]
    score_error = {c: [0.0, 0] for c in codecs}
    sink_share = []
    for q, k, v in layers:
        out, weights, scores = attention(q, k, v, positions)
        sink_share.append(float(weights[..., 0].mean()))
        finite = np.isfinite(scores)
        for codec in codecs:
            k2, v2 = codecs_ref.roundtrip(codec, k, v, page_tokens)
            k_sink = k2.copy()
            k_sink[0] = k[0]
            for variant, kk, vv in (("both", k2, v2), ("keys", k2, v), ("values", k, v2), ("keys, token 0 exact", k_sink, v)):
                out2, _, scores2 = attention(q, kk, vv, positions)
                entry = sums.setdefault((codec, variant), [0.0, 0.0])
                entry[0] += float(((out2 - out) ** 2).sum())
                entry[1] += float((out ** 2).sum())
                if variant == "keys":
                    score_error[codec][0] += float(((scores2[finite] - scores[finite]) ** 2).sum())
                    score_error[codec][1] += int(finite.sum())
    return {
        "layers": len(layers), "tokens": tokens, "queryPositions": len(positions),
        "attentionError": {c: {variant: round((e[0] / e[1]) ** 0.5, 5) for (cc, variant), e in sums.items() if cc == c} for c in codecs},
        "scoreRMSErrorKeysAlone": {c: round((e[0] / max(1, e[1])) ** 0.5, 5) for c, e in score_error.items()},
        "firstTokenAttentionShare": {"mean": round(float(np.mean(sink_share)), 4), "maxLayer": round(float(np.max(sink_share)), 4),
                                     "perLayer": [round(x, 4) for x in sink_share]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capture", action="append", required=True, metavar="NAME=FOLDER")
    parser.add_argument("--codecs", default="q8,tq3m", help="codecs of codecs_ref.py (default q8,tq3m)")
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--page-tokens", type=int, default=codecs_ref.PAGE_TOKENS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    codecs = [c for c in args.codecs.split(",") if c]
    report = {}
    for spec in args.capture:
        name, _, folder = spec.partition("=")
        if not folder:
            parser.error(f"--capture {spec!r}: write NAME=FOLDER")
        report[name] = analyze(load(folder), codecs, args.stride, args.page_tokens)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for name, r in report.items():
            print(f"{name}: {r['layers']} layers × {r['tokens']} tokens, {r['queryPositions']} query positions per layer")
            print(f"  first token's share of attention: mean {r['firstTokenAttentionShare']['mean']:.3f}, "
                  f"largest layer {r['firstTokenAttentionShare']['maxLayer']:.3f}")
            for codec, variants in r["attentionError"].items():
                cells = ", ".join(f"{variant} {error:.4f}" for variant, error in variants.items())
                print(f"  {codec}: attention error {cells}; score RMS error (keys alone) {r['scoreRMSErrorKeysAlone'][codec]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
