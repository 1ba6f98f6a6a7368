#!/usr/bin/env python3
"""Prefill (time to first token) of a Llama-3-8B-shaped model with random weights, the size of
the KV cache it leaves, and host-to-device copy time of that many bytes (pinned and pageable).

The other half of "restore versus recompute": `kvtier bench disk` measures how fast the disk
tier delivers fp16 KV to host memory; this measures what recomputing it costs on the GPU and
what moving it onto the GPU costs. `compare.py` puts the two together.

    python3 Benchmarks/gpu/prefill.py --out prefill.json             # 4K, 16K, 32K tokens
    python3 Benchmarks/gpu/prefill.py --tokens 1024 --layers 2       # quick smoke test

Needs a CUDA GPU with about 23 GiB free for 32K tokens (16 GB of bf16 weights, 4 GiB of KV,
activations), PyTorch and Transformers. Random weights: speed only, no quality.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

MiB = 1 << 20


def kv_bytes_expected(cfg, tokens, elem_bytes=2):
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * tokens * elem_bytes


def cache_bytes(pkv):
    """Bytes held by the K and V tensors of a transformers cache (any of its layouts)."""
    tensors = []
    if hasattr(pkv, "layers"):  # transformers >= 4.56: DynamicCache.layers[i].keys / .values
        for layer in pkv.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if torch.is_tensor(t):
                    tensors.append(t)
    elif hasattr(pkv, "key_cache"):
        tensors = list(pkv.key_cache) + list(pkv.value_cache)
    else:  # legacy tuple of (k, v) per layer
        for layer in pkv:
            tensors.extend(t for t in layer if torch.is_tensor(t))
    dtypes = sorted({str(t.dtype) for t in tensors})
    shapes = sorted({tuple(t.shape) for t in tensors})
    return sum(t.numel() * t.element_size() for t in tensors), len(tensors), dtypes, [list(s) for s in shapes]


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
    )
    cfg._attn_implementation = args.attn
    torch.set_default_dtype(torch.bfloat16)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    if next(model.parameters()).dtype != torch.bfloat16:
        model = model.to(torch.bfloat16)
    model.eval()
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    torch.set_default_dtype(torch.float32)
    return cfg, model, build_s


def attention_context(mode):
    """Restricts SDPA to fused kernels (flash / cuDNN) so a silently materialised causal mask
    (and the O(n^2) math path) would fail loudly instead of being timed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if mode == "fused":
        backends = [SDPBackend.FLASH_ATTENTION]
        if hasattr(SDPBackend, "CUDNN_ATTENTION"):
            backends.append(SDPBackend.CUDNN_ATTENTION)
        return sdpa_kernel(backends)
    import contextlib

    return contextlib.nullcontext()


def forward(model, ids):
    try:
        return model(input_ids=ids, use_cache=True, logits_to_keep=1)
    except TypeError:
        return model(input_ids=ids, use_cache=True, num_logits_to_keep=1)


def time_prefill(model, cfg, tokens, repeats, sdpa_mode):
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), device="cuda", generator=gen)
    times = []
    info = {}
    with torch.inference_mode(), attention_context(sdpa_mode):
        for i in range(repeats + 1):  # the first is a warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = forward(model, ids)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if i == 0:
                nbytes, ntensors, dtypes, shapes = cache_bytes(out.past_key_values)
                info = {
                    "kvCacheBytes": nbytes,
                    "kvCacheTensors": ntensors,
                    "kvCacheDtypes": dtypes,
                    "kvCacheShapes": shapes,
                    "logitsShape": list(out.logits.shape),
                    "warmupSeconds": dt,
                }
            else:
                times.append(dt)
            del out
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.empty_cache()
    params = sum(p.numel() for p in model.parameters())
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    # 2 FLOPs per weight per token (the LM head only for the last token), plus causal attention
    # (QK^T and PV: 2 * 2 * n^2/2 * heads * head_dim per layer).
    lm_head = cfg.vocab_size * cfg.hidden_size
    flops = 2 * (params - lm_head) * tokens + 2 * lm_head + cfg.num_hidden_layers * 2 * tokens * tokens * cfg.num_attention_heads * head_dim
    med = statistics.median(times)
    return {
        "tokens": tokens,
        "prefillSecondsMedian": med,
        "prefillSecondsMin": min(times),
        "prefillSecondsAll": times,
        "tokensPerSecond": tokens / med,
        "approxTFLOPs": flops / med / 1e12,
        "kvCacheBytesExpected": kv_bytes_expected(cfg, tokens),
        "peakGPUMemoryBytes": peak,
        **info,
    }


def time_h2d(nbytes, repeats, chunk=32 * MiB):
    """Host-to-device copy of nbytes: from pinned memory (whole, and in 32 MiB page-sized
    chunks), and from pageable memory. Buffers are allocated and touched before timing."""
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    t0 = time.perf_counter()
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pinned.fill_(1)
    pin_alloc_s = time.perf_counter() - t0
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    pageable.fill_(2)

    def timed(fn):
        fn()  # warm-up
        torch.cuda.synchronize()
        out = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            out.append(time.perf_counter() - t)
        return out

    whole_pinned = timed(lambda: dst.copy_(pinned, non_blocking=True))

    def chunks():
        for off in range(0, nbytes, chunk):
            end = min(off + chunk, nbytes)
            dst[off:end].copy_(pinned[off:end], non_blocking=True)

    chunked_pinned = timed(chunks)
    whole_pageable = timed(lambda: dst.copy_(pageable))
    ok = bool((dst[:: max(1, nbytes // 4096)] == 2).all().item())
    del dst, pinned, pageable
    torch.cuda.empty_cache()
    res = {"bytes": nbytes, "pinnedAllocAndTouchSeconds": pin_alloc_s, "copyVerified": ok}
    for name, ts in (("pinned", whole_pinned), ("pinned32MiBChunks", chunked_pinned), ("pageable", whole_pageable)):
        med = statistics.median(ts)
        res[name + "Seconds"] = med
        res[name + "GBps"] = nbytes / med / 1e9
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="4096,16384,32768", help="comma-separated prompt lengths")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per length, after one warm-up (median reported)")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32 for Llama-3-8B; fewer for a smoke test)")
    ap.add_argument("--attn", default="sdpa", help="transformers attention implementation (sdpa, eager, flash_attention_2)")
    ap.add_argument("--sdpa", default="fused", choices=["fused", "any"], help="fused: only flash/cuDNN SDPA kernels")
    ap.add_argument("--out", help="also write the JSON report here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("prefill.py needs a CUDA GPU")
    tokens = [int(t) for t in args.tokens.split(",") if t]

    import transformers

    report = {
        "device": torch.cuda.get_device_name(0),
        "gpuMemoryBytes": torch.cuda.get_device_properties(0).total_memory,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "hostCpus": os.cpu_count(),
        "attnImplementation": args.attn,
        "sdpaKernels": args.sdpa,
        "dtype": "bfloat16",
        "repeats": args.repeats,
    }
    cfg, model, build_s = build_model(args)
    report["model"] = {
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "intermediate": cfg.intermediate_size,
        "heads": cfg.num_attention_heads,
        "kvHeads": cfg.num_key_value_heads,
        "vocab": cfg.vocab_size,
        "maxPositions": cfg.max_position_embeddings,
        "parameters": sum(p.numel() for p in model.parameters()),
        "buildSeconds": build_s,
        "attnImplementationUsed": getattr(model.config, "_attn_implementation", None),
    }
    print(json.dumps({"model": report["model"]}), flush=True)
    report["prefill"] = []
    for n in tokens:
        try:
            r = time_prefill(model, cfg, n, args.repeats, args.sdpa)
        except RuntimeError as e:
            if args.sdpa != "fused" or "kernel" not in str(e).lower():
                raise
            print(f"fused SDPA refused at {n} tokens ({e}); timing with any SDPA kernel", file=sys.stderr)
            r = time_prefill(model, cfg, n, args.repeats, "any")
            r["sdpaFallback"] = str(e)[:300]
        report["prefill"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k not in ("kvCacheShapes",)}), flush=True)
    del model
    torch.cuda.empty_cache()
    report["h2d"] = []
    for r in report["prefill"]:
        h = time_h2d(r["kvCacheBytes"], args.repeats)
        h["tokens"] = r["tokens"]
        report["h2d"].append(h)
        print(json.dumps(h), flush=True)
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
