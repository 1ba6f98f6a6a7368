#!/usr/bin/env python3
"""SmolLM2-135M-Instruct: the NLL change of a KV codec after a restored prefix.

For every window of `--window` tokens (1024) of the held-out text, the model runs the first
`--prefix` tokens (768, three pages of 256) with a KV cache; that cache -- every layer's keys
(after RoPE, as Transformers caches them) and values -- is round-tripped through the codec page
by page, as the disk tier would store and restore it, and the model then reads the last 256
tokens against the restored cache. The figure is the mean negative log-likelihood of those
tokens' next-token predictions (255 per window: the first continuation token's prediction comes
from the prefix's last position, which no codec touches), against the same with the cache
unmodified (float32, no codec).

Windows start every `--stride` tokens (256): the scored parts never overlap, the prefixes do.
Benchmarks/data/heldout-prose.txt is 4,724 tokens, so 15 windows and 3,825 scored tokens.

  python3 Benchmarks/quality/smollm2_nll.py tq3 tq3m          # a quick look; eval_codecs.py --model
                                                              # smollm2 is the full report
Library use: `Windows(...)` holds the prefix caches once; `nll(roundtrip)` per codec. With
`cache_dir` (eval_codecs.py passes /tmp) the prefix caches and the baseline are kept on disk
(~0.5 GB) and reused by later runs with the same model, text and windows.
The model comes from Benchmarks/vllm/smollm2.py `prepare()`; `Unavailable` says why it cannot.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_TEXT = os.path.join(REPO, "Benchmarks", "data", "heldout-prose.txt")
MODEL_NAME = "SmolLM2-135M-Instruct"


class Unavailable(Exception):
    """The model (or torch / transformers) is not available here; the message says why."""


def model_folder() -> str:
    for module in ("torch", "transformers"):
        if importlib.util.find_spec(module) is None:
            raise Unavailable(f"the Python package {module} is missing from {sys.executable}")
    path = os.path.join(REPO, "Benchmarks", "vllm", "smollm2.py")
    spec = importlib.util.spec_from_file_location("kvtier_smollm2", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        return str(mod.prepare())
    except mod.Unavailable as e:
        raise Unavailable(f"SmolLM2 cannot be prepared: {e}") from e


class Windows:
    """The text's windows with their prefix caches, computed once; `nll` scores a codec."""

    def __init__(self, text=DEFAULT_TEXT, window=1024, prefix=768, stride=256, max_windows=None,
                 threads=None, batch=8, cache_dir=None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        folder = model_folder()
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
        self.model.eval()
        cfg = self.model.config
        self.layers, self.kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        ids = self.tokenizer(open(text, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
        starts = list(range(0, len(ids) - window + 1, stride))
        if max_windows is not None:
            starts = starts[:max_windows]
        if not starts:
            raise ValueError(f"{text} has {len(ids)} tokens, fewer than one window of {window}")
        self.text, self.window, self.prefix, self.stride, self.batch = text, window, prefix, stride, batch
        self.tokens = torch.tensor([ids[s:s + window] for s in starts])  # [W, window]
        # Per window: the prefix cache (float32 numpy, [layers][k|v] -> [prefix, kv_heads, d]).
        # Computing them and the baseline takes minutes on 2 cores, so they are kept in `cache_dir`
        # under a key of everything they depend on (model folder, text bytes, window geometry).
        import hashlib

        key = hashlib.sha256(repr((folder, open(text, "rb").read(), window, prefix, stride, len(starts),
                                   torch.__version__)).encode()).hexdigest()[:16]
        path = os.path.join(cache_dir, f"kvtier-smollm2-windows-{key}.npz") if cache_dir else None
        t0 = time.time()
        if path and os.path.exists(path):
            z = np.load(path)
            self.caches = [[(z[f"k{w}_{l}"], z[f"v{w}_{l}"]) for l in range(self.layers)] for w in range(len(starts))]
            self.baseline = z["baseline"]
            self.prefix_seconds = time.time() - t0
            return
        self.caches = []
        with torch.no_grad():
            for a in range(0, len(starts), batch):
                out = self.model(input_ids=self.tokens[a:a + batch, :prefix], use_cache=True)
                kv = self._cache_arrays(out.past_key_values)
                for w in range(kv[0][0].shape[0]):
                    self.caches.append([(k[w].transpose(1, 0, 2).copy(), v[w].transpose(1, 0, 2).copy()) for k, v in kv])
        self.prefix_seconds = time.time() - t0
        self.baseline = self.nll(None)
        if path:
            arrays = {f"{n}{w}_{l}": c[l][i] for w, c in enumerate(self.caches) for l in range(self.layers)
                      for i, n in enumerate("kv")}
            tmp = path + f".{os.getpid()}.tmp.npz"
            np.savez(tmp, baseline=self.baseline, **arrays)
            os.replace(tmp, path)

    @staticmethod
    def _cache_arrays(cache):
        """[(k, v)] per layer as numpy float32 [B, kv_heads, T, d], from any Transformers cache."""
        if hasattr(cache, "layers"):
            return [(l.keys.float().numpy(), l.values.float().numpy()) for l in cache.layers]
        return [(k.float().numpy(), v.float().numpy()) for k, v in cache]

    def _cache(self, arrays):
        """A DynamicCache from per-layer (k, v) numpy [B, kv_heads, T, d]."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer, (k, v) in enumerate(arrays):
            cache.update(self.torch.from_numpy(np.ascontiguousarray(k)), self.torch.from_numpy(np.ascontiguousarray(v)), layer)
        return cache

    def nll(self, roundtrip):
        """Per-window mean NLL (nats/token) of the continuation, with the prefix cache
        round-tripped by `roundtrip(k, v) -> (k2, v2)` ([T, H, d] arrays), or as computed when
        `roundtrip` is None. Returns a numpy array [windows]."""
        torch = self.torch
        per_window = []
        for a in range(0, len(self.caches), self.batch):
            group = self.caches[a:a + self.batch]
            layers = []
            for layer in range(self.layers):
                ks, vs = [], []
                for cache in group:
                    k, v = cache[layer]
                    if roundtrip is not None:
                        k, v = roundtrip(k, v)
                    ks.append(np.asarray(k, dtype=np.float32).transpose(1, 0, 2))
                    vs.append(np.asarray(v, dtype=np.float32).transpose(1, 0, 2))
                layers.append((np.stack(ks), np.stack(vs)))
            tokens = self.tokens[a:a + len(group)]
            with torch.no_grad():
                out = self.model(input_ids=tokens[:, self.prefix:], past_key_values=self._cache(layers), use_cache=True)
            logp = torch.log_softmax(out.logits[:, :-1].double(), dim=-1)
            target = tokens[:, self.prefix + 1:]
            nll = -logp.gather(-1, target[..., None])[..., 0]  # [B, window - prefix - 1]
            per_window.extend(nll.mean(-1).tolist())
        return np.asarray(per_window)

    def scored_tokens(self):
        return len(self.caches) * (self.window - self.prefix - 1)


def change(windows: Windows, per_window):
    """(mean NLL, % change of the mean, per-window % changes) against the baseline."""
    base = windows.baseline
    mean = float(per_window.mean())
    pct = 100.0 * (mean - float(base.mean())) / float(base.mean())
    return mean, pct, (100.0 * (per_window - base) / base).tolist()


def main(argv=None):
    import argparse

    sys.path.insert(0, HERE)
    import codecs_ref

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("codecs", nargs="*", default=["fp16", "tq3", "tq3m"])
    ap.add_argument("--windows", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        w = Windows(max_windows=args.windows)
    except Unavailable as e:
        print(f"smollm2_nll: SKIPPED: {e}", file=sys.stderr)
        return 2
    print(f"{len(w.caches)} windows, {w.scored_tokens()} scored tokens, baseline NLL {w.baseline.mean():.4f} "
          f"(prefix caches in {w.prefix_seconds:.1f}s)")
    for name in args.codecs:
        t0 = time.time()
        mean, pct, _ = change(w, w.nll(lambda k, v: codecs_ref.roundtrip(name, k, v)))
        print(f"{name:10s} {codecs_ref.bits_per_element(name, H=w.kv_heads, D=w.head_dim):.4f} b/el  "
              f"NLL {mean:.4f}  {pct:+.2f}%  ({time.time() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
