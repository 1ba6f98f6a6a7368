#!/usr/bin/env python3
"""Design-space exploration for the sub-3-bit codecs of issue 13, on both models.

  python3 Benchmarks/quality/explore_sub3.py --model smollm2 [--only SUBSTR] >> explore-sub3.jsonl
  python3 Benchmarks/quality/explore_sub3.py --model fixture [--only SUBSTR] >> explore-sub3.jsonl
  python3 Benchmarks/quality/explore_sub3.py --list            # designs with their bits/element
  python3 Benchmarks/quality/explore_sub3.py --table Benchmarks/quality/explore-sub3-results.jsonl
                                                   # the markdown table of README.md (both models)

One JSON line per (model, design): exact bits/element at the model's own KV heads and head dim
(pages of 256 tokens), K/V/attention-output errors on the model's captured tensors, and the
quality change (fixture: bits per byte, every token's K/V round-tripped; SmolLM2: NLL after a
restored 768-token prefix) with its standard error over windows and the per-window changes.
Designs are codecs_ref.Design objects; labels: `m` per-page channel mean removed, `s` per-page
channel std divided out, `tqB` Hadamard + Lloyd-Max B bits (B = 2.5: half the rotated
coordinates 3-bit, half 2-bit), `p` projection-preserving alpha, `l` log8 alpha (one byte per
vector, one fp16 maximum per head and page), `+r` residual mean added back, `N first exact` the
page's first N tokens stored as fp16, `N dist exact` the N tokens whose keys are farthest from
the page's key mean (plus a one-byte index each). `#sN`: the same design with another Hadamard
sign seed (noise).
"""
import argparse, json, os, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import codecs_ref as C  # noqa: E402
import eval_codecs as E  # noqa: E402
from codecs_ref import Part as P, Design  # noqa: E402

SEEDS = [0x1234567, 0xBEEF01, 0x5EED5]


def tq(bits, **kw):
    return P("tq", bits, **kw)


def designs():
    d = {}

    def add(name, k, v, **kw):
        d[name] = Design(k, v, **kw)

    # references
    add("tq3", tq(3), tq(3))
    add("tq3m", tq(3, center=True), tq(3, center=True))
    add("tq2", tq(2), tq(2))
    # what each idea does at 3 bits (fp16 alphas): alpha, sink, centring
    add("tq3p", tq(3, alpha="proj"), tq(3, alpha="proj"))
    add("tq3m+1x", tq(3, center=True), tq(3, center=True), exact=1)
    add("tq3l", tq(3, scale_bits=8), tq(3, scale_bits=8))
    # <= 3.0 class
    add("K3pl/V2.5pl", tq(3, alpha="proj", scale_bits=8), tq(2.5, alpha="proj", scale_bits=8))
    add("K3l/V2.5l", tq(3, scale_bits=8), tq(2.5, scale_bits=8))
    add("K3pl/V2.5pl+1x", tq(3, alpha="proj", scale_bits=8), tq(2.5, alpha="proj", scale_bits=8), exact=1)
    add("Km3pl/V2.5pl+1x", tq(3, alpha="proj", scale_bits=8, center=True), tq(2.5, alpha="proj", scale_bits=8), exact=1)
    add("Km3pl/Vm2.5pl+1x", tq(3, alpha="proj", scale_bits=8, center=True), tq(2.5, alpha="proj", scale_bits=8, center=True), exact=1)
    add("Km3l/Vm2.5l+1x", tq(3, scale_bits=8, center=True), tq(2.5, scale_bits=8, center=True), exact=1)
    add("Km3pl/Vm2.5pl+1d", tq(3, alpha="proj", scale_bits=8, center=True), tq(2.5, alpha="proj", scale_bits=8, center=True), exact=1, exact_mode="dist")
    # <= 2.5 class
    add("K2.5pl/V2pl", tq(2.5, alpha="proj", scale_bits=8), tq(2, alpha="proj", scale_bits=8))
    add("K2.5pl/V2pl+1x", tq(2.5, alpha="proj", scale_bits=8), tq(2, alpha="proj", scale_bits=8), exact=1)
    add("Km2.5pl/V2pl+1x", tq(2.5, alpha="proj", scale_bits=8, center=True), tq(2, alpha="proj", scale_bits=8), exact=1)
    add("Km2.5pl/Vm2pl+1x", tq(2.5, alpha="proj", scale_bits=8, center=True), tq(2, alpha="proj", scale_bits=8, center=True), exact=1)
    add("Km3l/Vm2.5l", tq(3, scale_bits=8, center=True), tq(2.5, scale_bits=8, center=True))
    add("Km2.5l/Vm2l", tq(2.5, scale_bits=8, center=True), tq(2, scale_bits=8, center=True))
    add("Km2.5l/Vm2l+1x", tq(2.5, scale_bits=8, center=True), tq(2, scale_bits=8, center=True), exact=1)
    # noise: the winners (= tq3s, tq2s) with other Hadamard sign seeds
    for j, sd in enumerate(SEEDS[:2]):
        add(f"tq3s #s{j}", tq(3, scale_bits=8, center=True, seed=sd), tq(2.5, scale_bits=8, center=True, seed=sd), exact=1)
        add(f"tq2s #s{j}", tq(2.5, scale_bits=8, center=True, seed=sd), tq(2, scale_bits=8, center=True, seed=sd), exact=1)
    # ablations of the winners: no kept token / no centring of keys or values
    add("K3l/Vm2.5l+1x", tq(3, scale_bits=8), tq(2.5, scale_bits=8, center=True), exact=1)
    add("Km3l/V2.5l+1x", tq(3, scale_bits=8, center=True), tq(2.5, scale_bits=8), exact=1)
    add("K3l/V2.5l+1x", tq(3, scale_bits=8), tq(2.5, scale_bits=8), exact=1)
    return d


def bpe(design, H, D):
    return C.design_bits_per_element(design, C.PAGE_TOKENS, H, D)


def table(paths):
    """One row per design (in first-seen order; the last result of a (model, design) wins): both
    models' bits/element, quality change with its standard error, and errors."""
    rows, order = {}, []
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            if r["design"] not in order:
                order.append(r["design"])
            rows[(r["model"], r["design"])] = r
    ds = designs()
    out = ["| design | label | b/el fixture (d=128) | fixture bpb change | b/el SmolLM2 (d=64) | SmolLM2 NLL change "
           "| K / V / attn err. fixture | K / V / attn err. SmolLM2 |",
           "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]

    def cells(model, name):
        r = rows.get((model, name))
        if r is None:
            dz = ds.get(name)
            b = "" if dz is None else f"{bpe(dz, *((2, 128) if model == 'fixture' else (3, 64))):.4f}"
            return b, "-", "-"
        return (f"{r['bpe']:.4f}", f"{r['change_pct']:+.2f}% ± {r['change_se_pct']:.2f}",
                f"{r['k_rel_err']:.3f} / {r['v_rel_err']:.3f} / {r['attn_rel_err']:.3f}")

    for name in order:
        f, s = cells("fixture", name), cells("smollm2", name)
        label = (rows.get(("smollm2", name)) or rows.get(("fixture", name)))["label"]
        out.append(f"| {name} | {label} | {f[0]} | {f[1]} | {s[0]} | {s[1]} | {f[2]} | {s[2]} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["fixture", "smollm2"], default="smollm2")
    ap.add_argument("--only", default=None, help="comma-separated design names (exact), or a substring")
    ap.add_argument("--windows", type=int, default=None)
    ap.add_argument("--fixtures", default=E.DEFAULT_FIXTURES)
    ap.add_argument("--capture", default=None)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", nargs="+", metavar="JSONL", help="print the markdown table of these results and exit")
    a = ap.parse_args()
    if a.table:
        print(table(a.table))
        return
    ds = designs()
    if a.only:
        names = a.only.split(",")
        ds = {k: ds[k] for k in names} if all(n in ds for n in names) else {k: v for k, v in ds.items() if a.only in k}
    if a.list:
        for k, v in ds.items():
            print(f"{k:24s} fixture {bpe(v, 2, 128):.4f}  smollm2 {bpe(v, 3, 64):.4f}  {v.label()}")
        return
    model = E.FixtureModel(a.fixtures, E.DEFAULT_TEXT, a.windows) if a.model == "fixture" else E.SmolLM2Model(E.DEFAULT_TEXT, a.windows, a.capture)
    for name, dz in ds.items():
        t0 = time.time()
        rt = lambda k, v, dz=dz: dz.roundtrip(k, v)
        r = {"model": a.model, "design": name, "label": dz.label(), "bpe": bpe(dz, model.H, model.D)}
        m = E.tensor_metrics(rt, model.layers, model.refs)
        m.pop("attn_rel_err_per_layer")
        r.update(m)
        r.update(model.score(rt))
        r["sec"] = round(time.time() - t0, 1)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
