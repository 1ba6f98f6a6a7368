#!/usr/bin/env python3
"""End-to-end quality harness for KVTier KV codecs, on the fixture model and on SmolLM2-135M.

For each codec and model: exact bits/element at the model's own KV heads and head dim (a full
page of 256 tokens), K and V relative error and causal attention-output relative error on the
model's captured tensors, and the quality change:

  fixture  (fixtures/tinyllama, head dim 128) bits per byte on held-out prose with every token's
           K and V round-tripped inside the forward pass (20 windows of 1024 bytes); tensors:
           fixtures/kv/tinyllama-license.
  smollm2  (SmolLM2-135M-Instruct, head dim 64) NLL of 256 tokens after a restored 768-token
           prefix whose cache was round-tripped (smollm2_nll.py, 15 windows); tensors: a
           capture_kvq.py capture (--capture, made when missing).

Every quality change comes with its standard error over windows (paired per-window changes).

  python3 Benchmarks/quality/eval_codecs.py                       # fixture, numpy reference codecs
  python3 Benchmarks/quality/eval_codecs.py --model both fp16 tq3s tq2s
  python3 Benchmarks/quality/eval_codecs.py fp16 tq4 --windows 4  # quicker
  python3 Benchmarks/quality/eval_codecs.py --backend cli --kvtier .build/release/kvtier
  ... --json / --out FILE                                         # JSON instead of / besides markdown

Backends:
  numpy  the reference implementations in codecs_ref.py (next to this file).
  cli    `KVTIER codec roundtrip --codec NAME --keys K.npy --values V.npy --out-keys K2.npy
         --out-values V2.npy --page-tokens 256 --json`, on float16 [T, H, D] .npy files; its JSON
         must carry `bitsPerElement` and `encodedBytes`.

Baselines: the unmodified model (float32 K/V, no codec); the `fp16` row is therefore the cost of
the float16 cache itself. Attention errors are against the float16 captured tensors (computed in
float32). SmolLM2 exits with "SKIPPED" and the reason when the model cannot be prepared.
"""
import argparse, json, math, os, shutil, subprocess, sys, tempfile, time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import codecs_ref  # noqa: E402

DEFAULT_CODECS = ["fp16", "q8", "k4v4", "tq4", "tq3", codecs_ref.AGGRESSIVE_NAME]
DEFAULT_FIXTURES = os.path.normpath(os.path.join(REPO, "..", "shared", "fixtures"))
DEFAULT_TEXT = os.path.join(REPO, "Benchmarks", "data", "heldout-prose.txt")
KV_SET = "tinyllama-license"
WINDOW = 1024


# ----------------------------------------------------------------------------- backends

class NumpyBackend:
    name = "numpy"

    def __init__(self, codec, page_tokens):
        if codec not in codecs_ref.CODECS:
            raise SystemExit(f"unknown codec {codec!r} for the numpy backend; known: {', '.join(codecs_ref.CODECS)}")
        self.codec, self.page_tokens = codec, page_tokens

    def roundtrip(self, k, v):
        return codecs_ref.roundtrip(self.codec, k, v, self.page_tokens)

    def bits_per_element(self, T, H, D):
        return codecs_ref.bits_per_element(self.codec, T, H, D, self.page_tokens)


class CliBackend:
    name = "cli"

    def __init__(self, codec, page_tokens, kvtier):
        self.codec, self.page_tokens, self.kvtier = codec, page_tokens, kvtier
        self.tmp = tempfile.mkdtemp(prefix="kvtier-eval-")
        self.last = {}

    def close(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _run(self, k, v):
        p = lambda n: os.path.join(self.tmp, n)
        np.save(p("k.npy"), np.ascontiguousarray(k, dtype=np.float16))
        np.save(p("v.npy"), np.ascontiguousarray(v, dtype=np.float16))
        for n in ("k2.npy", "v2.npy"):
            if os.path.exists(p(n)):
                os.remove(p(n))
        cmd = [self.kvtier, "codec", "roundtrip", "--codec", self.codec,
               "--keys", p("k.npy"), "--values", p("v.npy"),
               "--out-keys", p("k2.npy"), "--out-values", p("v2.npy"),
               "--page-tokens", str(self.page_tokens), "--json"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"kvtier failed (exit {r.returncode}): {' '.join(cmd)}\n{r.stderr.strip()}\n{r.stdout.strip()}")
        info = _last_json_object(r.stdout)
        if info is None or "bitsPerElement" not in info or "encodedBytes" not in info:
            raise SystemExit(f"kvtier printed no JSON with bitsPerElement and encodedBytes:\n{r.stdout}")
        k2, v2 = np.load(p("k2.npy")), np.load(p("v2.npy"))
        if k2.shape != k.shape or v2.shape != v.shape:
            raise SystemExit(f"kvtier output shapes {k2.shape} {v2.shape} != input {k.shape} {v.shape}")
        self.last = info
        return k2.astype(np.float32), v2.astype(np.float32)

    def roundtrip(self, k, v):
        return self._run(k, v)

    def bits_per_element(self, T, H, D):
        # one full round trip of a T-token section of zeros-free random data gives the figure
        rng = np.random.default_rng(0)
        x = rng.standard_normal((T, H, D)).astype(np.float16)
        self._run(x, x)
        bpe = float(self.last["bitsPerElement"])
        from_bytes = 8.0 * float(self.last["encodedBytes"]) / (2 * T * H * D)
        if abs(bpe - from_bytes) > 1e-6:
            print(f"warning: {self.codec}: bitsPerElement {bpe} but encodedBytes gives {from_bytes:.6f}", file=sys.stderr)
        return bpe


def _last_json_object(text):
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    for i in range(len(text) - 1, -1, -1):  # last line / block that parses
        if text[i] == "{":
            try:
                return json.loads(text[i:])
            except ValueError:
                continue
    return None


# ----------------------------------------------------------------------------- metrics

def load_kv(fixtures):
    d = os.path.join(fixtures, "kv", KV_SET)
    layers = []
    L = 0
    while os.path.exists(os.path.join(d, f"k_{L}.npy")):
        layers.append(tuple(np.load(os.path.join(d, f"{n}_{L}.npy")).astype(np.float32) for n in "qkv"))
        L += 1
    return layers


def causal_attention(q, k, v):
    """q [T, Hq, D], k/v [T, Hkv, D] float32 -> [T, Hq, D]; GQA: query head h uses kv head h // (Hq/Hkv)."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
    o = np.empty_like(q)
    for h in range(Hq):
        g = h // (Hq // Hkv)
        s = (q[:, h, :] @ k[:, g, :].T) / np.float32(np.sqrt(D)) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o[:, h, :] = s @ v[:, g, :]
    return o


def tensor_metrics(roundtrip, layers, refs=None):
    """Relative Frobenius errors aggregated over all layers: K, V, attention output."""
    ek = nk = ev = nv = eo = no = 0.0
    per_layer = []
    for i, (q, k, v) in enumerate(layers):
        k2, v2 = roundtrip(k, v)
        o = refs[i] if refs is not None else causal_attention(q, k, v)
        o2 = causal_attention(q, k2, v2)
        a, b = float(((k2 - k) ** 2).sum()), float((k ** 2).sum())
        c, d = float(((v2 - v) ** 2).sum()), float((v ** 2).sum())
        e, f = float(((o2 - o) ** 2).sum()), float((o ** 2).sum())
        ek += a; nk += b; ev += c; nv += d; eo += e; no += f
        per_layer.append(math.sqrt(e / f))
    return {"k_rel_err": math.sqrt(ek / nk), "v_rel_err": math.sqrt(ev / nv),
            "attn_rel_err": math.sqrt(eo / no), "attn_rel_err_per_layer": per_layer}


def load_model(fixtures):
    sys.path.insert(0, os.path.join(fixtures, "tinyllama"))
    import tinyllama
    return tinyllama, tinyllama.load(os.path.join(fixtures, "tinyllama"))


def bpb(tinyllama, model, data, windows, roundtrip=None):
    hook = None
    if roundtrip is not None:
        def hook(layer, k, v):
            return roundtrip(k, v)
    return float(tinyllama.bits_per_byte(model, data, window=WINDOW, kv_hook=hook, max_windows=windows))


def available_windows(n_bytes):
    return len(range(0, n_bytes - WINDOW - 1, WINDOW))


def window_bpb(tinyllama, model, data, windows, roundtrip=None):
    """Per-window bits per byte (every token's K/V round-tripped inside the forward pass)."""
    cfg = model[0]
    hook = None if roundtrip is None else (lambda layer, k, v: roundtrip(k, v))
    out = []
    for n, i in enumerate(range(0, len(data) - WINDOW - 1, WINDOW)):
        if n >= windows:
            break
        x = list(data[i:i + WINDOW])
        y = np.asarray(list(data[i + 1:i + WINDOW + 1]))
        logits = tinyllama.forward(model, x, hook)
        logits = logits - logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        out.append(float(-logp[np.arange(WINDOW), y].mean() / np.log(2)))
    return np.asarray(out)


def summarize(per_window, base):
    """Mean figure, % change of the mean, and the standard error of that change from the
    per-window paired changes (the window-to-window noise of the comparison)."""
    mean, b = float(per_window.mean()), float(base.mean())
    d = 100.0 * (per_window - base) / b
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return mean, 100.0 * (mean - b) / b, se


class FixtureModel:
    """The fixture model: bits-per-byte with every token's K/V round-tripped, errors on the
    captured license-text tensors."""
    name, metric = "fixture", "bpb"

    def __init__(self, fixtures, text, windows=None, bpb_enabled=True):
        kv_dir = os.path.join(fixtures, "kv", KV_SET)
        model_dir = os.path.join(fixtures, "tinyllama")
        missing = [p for p in (os.path.join(kv_dir, "k_0.npy"), os.path.join(model_dir, "tinyllama.py"),
                               os.path.join(model_dir, "config.json")) if not os.path.exists(p)]
        if missing:
            raise SystemExit(f"eval_codecs: fixtures not found ({', '.join(missing)}).\n"
                             f"Pass --fixtures DIR pointing at the shared fixtures (expected layout: DIR/kv/{KV_SET}/, DIR/tinyllama/).")
        self.layers = load_kv(fixtures)
        self.refs = [causal_attention(q, k, v) for q, k, v in self.layers]
        _, self.H, self.D = self.layers[0][1].shape
        self.text, self.base = text, None
        if bpb_enabled:
            if not os.path.exists(text):
                raise SystemExit(f"eval_codecs: held-out text not found: {text}")
            self.data = open(text, "rb").read()
            n = available_windows(len(self.data))
            self.windows = n if windows is None else min(windows, n)
            self.tl, self.model = load_model(fixtures)
            t0 = time.time()
            self.base = window_bpb(self.tl, self.model, self.data, self.windows)
            print(f"fixture baseline (no hook): {self.base.mean():.4f} bits/byte over {self.windows} windows "
                  f"in {time.time() - t0:.1f}s", file=sys.stderr)

    def describe(self):
        return {"model": "fixture tinyllama (byte-level, 6 layers, 2 KV heads x 128)", "text": self.text,
                "windows": getattr(self, "windows", 0), "window_tokens": WINDOW,
                "scored": "every token of every window, every token's K/V round-tripped",
                "baseline": None if self.base is None else float(self.base.mean()), "metric": "bits per byte",
                "tensors": f"fixtures/kv/{KV_SET}"}

    def score(self, roundtrip):
        per = window_bpb(self.tl, self.model, self.data, self.windows, roundtrip)
        mean, pct, se = summarize(per, self.base)
        return {"bpb": mean, "change_pct": pct, "change_se_pct": se,
                "window_change_pct": [round(x, 4) for x in (100.0 * (per - self.base) / self.base).tolist()]}


class SmolLM2Model:
    """SmolLM2-135M-Instruct: NLL after a restored prefix (smollm2_nll.py), errors on a Q/K/V
    capture (capture_kvq.py, made when missing)."""
    name, metric = "smollm2", "nll"

    def __init__(self, text, windows=None, capture=None, nll_enabled=True):
        import smollm2_nll
        self.text = text
        try:
            folder = smollm2_nll.model_folder()
        except smollm2_nll.Unavailable as e:
            raise SystemExit(f"eval_codecs: SKIPPED smollm2: {e}")
        capture = capture or "/tmp/kvtier-kvq-smollm2"
        if not os.path.exists(os.path.join(capture, "meta.json")):
            r = subprocess.run([sys.executable, os.path.join(HERE, "capture_kvq.py"), "--out", capture, "--model", folder],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"eval_codecs: capture_kvq.py failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
        self.capture = capture
        self.layers = load_capture(capture)
        self.refs = [causal_attention(q, k, v) for q, k, v in self.layers]
        _, self.H, self.D = self.layers[0][1].shape
        self.w = None
        if nll_enabled:
            t0 = time.time()
            self.w = smollm2_nll.Windows(text=text, max_windows=windows, cache_dir=tempfile.gettempdir())
            print(f"smollm2 baseline: NLL {self.w.baseline.mean():.4f} over {len(self.w.caches)} windows "
                  f"in {time.time() - t0:.1f}s", file=sys.stderr)

    def describe(self):
        w = self.w
        return {"model": "SmolLM2-135M-Instruct (30 layers, 3 KV heads x 64)", "text": self.text,
                "windows": 0 if w is None else len(w.caches), "window_tokens": None if w is None else w.window,
                "scored": None if w is None else (f"last {w.window - w.prefix - 1} predictions of each window after a "
                                                  f"restored {w.prefix}-token prefix (windows every {w.stride} tokens)"),
                "baseline": None if w is None else float(w.baseline.mean()), "metric": "NLL (nats/token)",
                "tensors": self.capture}

    def score(self, roundtrip):
        per = self.w.nll(roundtrip)
        mean, pct, se = summarize(per, self.w.baseline)
        return {"nll": mean, "change_pct": pct, "change_se_pct": se,
                "window_change_pct": [round(x, 4) for x in (100.0 * (per - self.w.baseline) / self.w.baseline).tolist()]}


def load_capture(folder):
    layers, L = [], 0
    while os.path.exists(os.path.join(folder, f"k_{L}.npy")):
        layers.append(tuple(np.load(os.path.join(folder, f"{n}_{L}.npy")).astype(np.float32) for n in "qkv"))
        L += 1
    if not layers:
        raise SystemExit(f"eval_codecs: no k_0.npy in {folder}")
    return layers


def make_backend(args, name):
    return NumpyBackend(name, args.page_tokens) if args.backend == "numpy" else CliBackend(name, args.page_tokens, args.kvtier)


def evaluate(model, backend, with_score=True):
    t0 = time.time()
    row = {"codec": backend.codec, "bits_per_element": backend.bits_per_element(backend.page_tokens, model.H, model.D)}
    row.update(tensor_metrics(backend.roundtrip, model.layers, model.refs))
    if with_score:
        row.update(model.score(backend.roundtrip))
    row["seconds"] = time.time() - t0
    return row


# ----------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("codecs", nargs="*", default=DEFAULT_CODECS, help=f"codec names (default: {' '.join(DEFAULT_CODECS)})")
    ap.add_argument("--model", choices=["fixture", "smollm2", "both"], default="fixture",
                    help="fixture (tinyllama, bits per byte), smollm2 (NLL after a restored prefix) or both")
    ap.add_argument("--backend", choices=["numpy", "cli"], default="numpy")
    ap.add_argument("--kvtier", help="path of the kvtier executable (--backend cli)")
    ap.add_argument("--fixtures", default=DEFAULT_FIXTURES, help=f"fixtures folder (default {DEFAULT_FIXTURES})")
    ap.add_argument("--text", default=DEFAULT_TEXT, help="held-out text (default Benchmarks/data/heldout-prose.txt)")
    ap.add_argument("--windows", type=int, default=None, help="windows of the text (default: all of it)")
    ap.add_argument("--capture", default=None, help="SmolLM2 Q/K/V capture folder (default /tmp/kvtier-kvq-smollm2, made when missing)")
    ap.add_argument("--page-tokens", type=int, default=codecs_ref.PAGE_TOKENS)
    ap.add_argument("--no-bpb", action="store_true", help="skip the model forward passes (tensor metrics only)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    ap.add_argument("--out", help="also write the JSON report to this file")
    args = ap.parse_args(argv)

    if args.backend == "cli":
        if not args.kvtier:
            sys.exit("eval_codecs: --backend cli needs --kvtier PATH")
        if not (os.path.isfile(args.kvtier) and os.access(args.kvtier, os.X_OK)):
            sys.exit(f"eval_codecs: {args.kvtier} is not an executable file")
    if args.backend == "numpy":
        unknown = [c for c in args.codecs if c not in codecs_ref.CODECS]
        if unknown:
            sys.exit(f"eval_codecs: unknown codec {unknown[0]!r} for the numpy backend; known: {', '.join(codecs_ref.CODECS)}")

    names = ["fixture", "smollm2"] if args.model == "both" else [args.model]
    result = {"backend": args.backend, "page_tokens": args.page_tokens, "models": {}}
    for name in names:
        if name == "fixture":
            model = FixtureModel(args.fixtures, args.text, args.windows, not args.no_bpb)
        else:
            model = SmolLM2Model(args.text, args.windows, args.capture, not args.no_bpb)
        rows = []
        for codec in args.codecs:
            backend = make_backend(args, codec)
            try:
                rows.append(evaluate(model, backend, not args.no_bpb))
            finally:
                if hasattr(backend, "close"):
                    backend.close()
            print(f"{name} {codec}: done in {rows[-1]['seconds']:.1f}s", file=sys.stderr)
        result["models"][name] = {**model.describe(), "kv_heads": model.H, "head_dim": model.D, "codecs": rows}
        del model
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1) if args.json else markdown(result))


def markdown(result):
    out = []
    for name, m in result["models"].items():
        metric = "bpb" if name == "fixture" else "nll"
        if m["baseline"] is not None:
            out.append(f"**{name}** — {m['model']}; text {os.path.basename(m['text'])}, {m['windows']} windows; "
                       f"scored: {m['scored']}; baseline {m['baseline']:.4f} {m['metric']}. Tensors: {m['tensors']}. "
                       f"Backend: {result['backend']}; pages of {result['page_tokens']} tokens.\n")
        out.append(f"| codec | bits/element (d = {m['head_dim']}) | {metric} | change | ± s.e. | K rel. err | V rel. err | attn-out rel. err |")
        out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in m["codecs"]:
            v = f"{r[metric]:.4f}" if metric in r else "-"
            c = f"{r['change_pct']:+.2f}%" if "change_pct" in r else "-"
            se = f"{r['change_se_pct']:.2f}%" if "change_se_pct" in r else "-"
            out.append(f"| {r['codec']} | {r['bits_per_element']:.4f} | {v} | {c} | {se} | {r['k_rel_err']:.4f} | "
                       f"{r['v_rel_err']:.4f} | {r['attn_rel_err']:.4f} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
