#!/usr/bin/env python3
"""Design-space exploration for the aggressive (<= 3.5 bits/element) codec.

  python3 Benchmarks/quality/explore_aggressive.py [--windows N] [--only SUBSTR] [--shard i/n]

Prints one JSON line per design (bits/element, K/V/attention errors on fixtures/kv, bpb change on
held-out prose with every token's K and V round-tripped). Designs are codecs_ref.Design objects.
"""
import argparse, json, os, sys, time
HERE = os.path.dirname(os.path.abspath(__file__)); sys.path.insert(0, HERE)
import numpy as np
import codecs_ref as C
import eval_codecs as E
from codecs_ref import Part as P, Design

def designs():
    d = {}
    S = [0x1234567, 0xBEEF01, 0x5EED5]  # alternative Hadamard sign seeds: noise of the bpb change
    def add(name, k, v): d[name] = Design(k, v)
    # reference points (fixture README)
    add("kivi4", P("kivi_c", 4), P("kivi_t", 4))
    add("kivi_k4v2", P("kivi_c", 4), P("kivi_t", 2))
    add("kivi2", P("kivi_c", 2), P("kivi_t", 2))
    add("tq4", P("tq", 4), P("tq", 4))
    # 3/3
    add("tq3", P("tq", 3), P("tq", 3))
    add("K m+tq3 / V tq3", P("tq", 3, center=True), P("tq", 3))
    add("K ms+tq3 / V tq3", P("tq", 3, center=True, scale=True), P("tq", 3))
    add("K ms+tq3 / V ms+tq3", P("tq", 3, center=True, scale=True), P("tq", 3, center=True, scale=True))
    add("K m+tq3 / V m+tq3", P("tq", 3, center=True), P("tq", 3, center=True))
    # 4/2
    add("K tq4 / V tq2", P("tq", 4), P("tq", 2))
    add("K m+tq4 / V tq2", P("tq", 4, center=True), P("tq", 2))
    add("K ms+tq4 / V tq2", P("tq", 4, center=True, scale=True), P("tq", 2))
    add("K ms+tq4 / V m+tq2", P("tq", 4, center=True, scale=True), P("tq", 2, center=True))
    add("K ms+tq4 / V ms+tq2", P("tq", 4, center=True, scale=True), P("tq", 2, center=True, scale=True))
    # KIVI at 3.5 (bigger groups)
    add("K kc3/64 / V kt3/64", P("kivi_c", 3, 64), P("kivi_t", 3, 64))
    add("K kc4/128 / V kt2/32", P("kivi_c", 4, 128), P("kivi_t", 2, 32))
    # what the budget would buy (over 3.5)
    add("K m+tq4 / V tq3 (3.66)", P("tq", 4, center=True), P("tq", 3))
    # batch 2: noise (other sign seeds), sensitivity, bit splits
    for j, sd in enumerate(S):
        add(f"tq3 #s{j}", P("tq", 3, seed=sd), P("tq", 3, seed=sd))
        add(f"K m+tq3 / V tq3 #s{j}", P("tq", 3, center=True, seed=sd), P("tq", 3, seed=sd))
        add(f"K m+tq3 / V m+tq3 #s{j}", P("tq", 3, center=True, seed=sd), P("tq", 3, center=True, seed=sd))
    add("K m+tq3 / V fp16", P("tq", 3, center=True), P("fp16"))
    add("K fp16 / V m+tq3", P("fp16"), P("tq", 3, center=True))
    add("K m+tq2 / V fp16", P("tq", 2, center=True), P("fp16"))
    add("K fp16 / V m+tq2", P("fp16"), P("tq", 2, center=True))
    add("K m+tq2 / V m+tq4", P("tq", 2, center=True), P("tq", 4, center=True))
    add("K m+tq4 / V m+tq2", P("tq", 4, center=True), P("tq", 2, center=True))
    add("K m+tq3 / V ms+tq3", P("tq", 3, center=True), P("tq", 3, center=True, scale=True))
    add("K m+tq2 / V m+tq3", P("tq", 2, center=True), P("tq", 3, center=True))
    add("K m+tq3 / V m+tq4 (3.69)", P("tq", 3, center=True), P("tq", 4, center=True))
    add("K m+tq4 / V m+tq4 (4.19)", P("tq", 4, center=True), P("tq", 4, center=True))
    return d

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=None)
    ap.add_argument("--only", default=None)
    ap.add_argument("--skip", type=int, default=0, help="skip the first N designs")
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--fixtures", default=E.DEFAULT_FIXTURES)
    ap.add_argument("--no-bpb", action="store_true")
    a = ap.parse_args()
    i, n = map(int, a.shard.split("/"))
    ds = [(k, v) for k, v in designs().items() if a.only is None or a.only in k]
    ds = ds[a.skip:][i::n]
    layers = E.load_kv(a.fixtures)
    refs = [E.causal_attention(q, k, v) for q, k, v in layers]
    if not a.no_bpb:
        tl, model = E.load_model(a.fixtures)
        data = open(E.DEFAULT_TEXT, "rb").read()
        nw = a.windows if a.windows else E.available_windows(len(data))
        base = E.bpb(tl, model, data, nw)
    for name, dz in ds:
        t0 = time.time()
        rt = lambda k, v, dz=dz: dz.roundtrip(k, v)
        r = {"design": name, "label": dz.label(), "bpe": C.design_bits_per_element(dz)}
        m = E.tensor_metrics(rt, layers, refs); r.update(m)
        if not a.no_bpb:
            b = E.bpb(tl, model, data, nw, rt)
            r.update(bpb=b, base=base, dpct=100 * (b - base) / base, windows=nw)
        r["sec"] = time.time() - t0
        print(json.dumps(r), flush=True)

if __name__ == "__main__":
    main()
