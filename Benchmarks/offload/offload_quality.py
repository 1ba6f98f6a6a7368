#!/usr/bin/env python3
"""Attention-weighted offload against a full cache, a sliding window and Monarch-style promotion:
quality (continuation NLL, passkey retrieval) and speed (decode tokens/s, pages kvtierd had in
RAM when asked), with a real kvtierd and a real pretrained model.

    python3 Benchmarks/offload/offload_quality.py --model smollm2 --contexts 4096,8192 \\
        [--budget 0.25] [--page 16] [--continuation 256] [--docs 2] [--passkeys 8] \\
        [--device cpu|cuda] [--ram-budget 4GiB] [--daemon .build/release/kvtierd] [--json out.json]
    python3 Benchmarks/offload/offload_quality.py --model fixture --contexts 768

Every method attends to at most ``budget`` of the context per step and per KV head (the plans'
``max_attended_tokens``): ``window`` (one sink page plus a sliding window), ``promote`` (sink,
window and promoted page slots, filled only by attention observed on visible pages: the prompt's
last token, or the window; Monarch-style), ``summary`` (the same slots, part promoted and part
fetched from kvtierd each step by key-bound summaries: kvtier.offload). ``full`` is the model's
own cache. The prompt is prefilled once with full attention; then every method decodes the same
tokens one forward per token: the continuation (teacher-forced) for NLL, the question and the
answer for a passkey.

Texts: the repository's docs at a fixed commit (--text-rev; no model saw them in training), each
a document, in order; a context and its continuation come from one document. Passkeys: the
usual filler, a 5-digit key at a seeded random depth, the question decoded through the cache.

``--ram-budget`` small (e.g. 64MiB at 8K tokens) puts most pages on kvtierd's disk: the run then
reports how many leased pages were in RAM at the GET and how many of those prefetch (from the
cache's ATTENTION reports) brought there; pages read from disk come through the daemon's disk
codec (k4v4 unless configured), so that run's NLL includes its quantization.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "clients" / "python" / "src"))
sys.path.insert(0, str(REPO / "Benchmarks" / "vllm"))

import torch  # noqa: E402
import transformers  # noqa: E402

import kvtier  # noqa: E402
from kvtier.local_daemon import LocalDaemon, find_daemon  # noqa: E402
from kvtier.offload import OffloadPlan  # noqa: E402
from kvtier.transformers import OffloadedCache, enable_offload  # noqa: E402

FIXTURE = Path(os.environ.get("KVTIER_FIXTURES", REPO.parent / "shared" / "fixtures")) / "tinyllama"
DOCS = ["architecture.md", "benchmarks.md", "security.md", "protocol.md", "operations.md", "testing.md", "codecs.md"]
METHODS = ("full", "window", "promote", "summary", "summary-noreport")


# ---------------------------------------------------------------- models

def load_smollm2(dtype):
    import smollm2

    folder = smollm2.prepare()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
    spec_dtype = "bfloat16"
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    decode = lambda ids: tokenizer.decode(ids)  # noqa: E731
    return model, spec_dtype, encode, decode, model.config.max_position_embeddings


def load_fixture(dtype):
    """The fixture's byte-level model as a Transformers Llama (same layout), checked against its
    NumPy forward pass."""
    sys.path.insert(0, str(FIXTURE))
    import numpy as np
    import tinyllama

    cfg, w = tinyllama.load(str(FIXTURE))
    config = transformers.LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["dim"], intermediate_size=cfg["ffn"],
                                      num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                                      num_key_value_heads=cfg["kv_heads"], head_dim=cfg["head_dim"],
                                      max_position_embeddings=cfg["seq"], rms_norm_eps=1e-5, rope_theta=cfg["theta"],
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    names = {"emb.weight": "model.embed_tokens.weight", "norm.w": "model.norm.weight", "head.weight": "lm_head.weight"}
    parts = {"n1.w": "input_layernorm.weight", "n2.w": "post_attention_layernorm.weight", "wq.weight": "self_attn.q_proj.weight",
             "wk.weight": "self_attn.k_proj.weight", "wv.weight": "self_attn.v_proj.weight", "wo.weight": "self_attn.o_proj.weight",
             "w1.weight": "mlp.gate_proj.weight", "w3.weight": "mlp.up_proj.weight", "w2.weight": "mlp.down_proj.weight"}
    state = {}
    for name, array in w.items():
        if name in names:
            state[names[name]] = torch.from_numpy(array)
        else:
            _, layer, part = name.split(".", 2)
            state[f"model.layers.{layer}.{parts[part]}"] = torch.from_numpy(array)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise SystemExit(f"fixture weights do not map onto a Llama: missing {missing}, unexpected {unexpected}")
    probe = list(b"The daemon keeps hot pages in memory.")
    want = tinyllama.forward((cfg, w), probe)
    with torch.no_grad():
        got = model(torch.tensor([probe])).logits[0].numpy()
    if not np.allclose(got, want, atol=2e-3):
        raise SystemExit(f"the Transformers fixture model differs from tinyllama.py by {abs(got - want).max()}")
    model = model.to(dtype)
    return model, "float16", (lambda text: list(text.encode())), (lambda ids: bytes(ids).decode(errors="replace")), cfg["seq"]


# ---------------------------------------------------------------- data

def documents(rev: str):
    for name in DOCS:
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:docs/{name}"], check=True, capture_output=True,
                              text=True).stdout
        yield name, text


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(encode, context: int, depth: float, key: str):
    """(haystack ids, question ids, answer): about ``context`` tokens with the key at ``depth``."""
    head = encode("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                  "I will quiz you about the important information there.\n")
    needle = encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    question = encode("\nWhat is the pass key? The pass key is")
    filler = encode(FILLER)
    room = context - len(head) - len(needle) - len(question)
    body = (filler * (room // len(filler) + 1))[:room]
    at = int(len(body) * depth)
    return head + body[:at] + needle + body[at:], question, key


# ---------------------------------------------------------------- running

class Runner:
    def __init__(self, args, model, spec, device, dtype):
        self.args, self.model, self.spec, self.device, self.dtype = args, model, spec, device, dtype
        self.query_heads = model.config.num_attention_heads

    def plans(self, context: int):
        budget = int(context * self.args.budget)
        p = self.args.page
        return {"window": OffloadPlan.for_budget(budget, p, "window"),
                "promote": OffloadPlan.for_budget(budget, p, "promote", window_pages=self.args.window_pages),
                "summary": OffloadPlan.for_budget(budget, p, "summary", window_pages=self.args.window_pages,
                                                  promoted_share=self.args.promoted_share, **self.dense(context))}

    def dense(self, context: int):
        """The summary plan's dense first layers (--dense-layers), as OffloadPlan.for_budget takes them."""
        if not self.args.dense_layers:
            return {}
        return dict(dense_layers=self.args.dense_layers, layers=self.model.config.num_hidden_layers, context_tokens=context)

    @torch.no_grad()
    def prefill(self, client, ids, plan):
        cache = OffloadedCache(client, self.spec, plan, query_heads=self.query_heads, dtype=self.dtype, device=self.device)
        logits = self.model(torch.tensor([ids], device=self.device), past_key_values=cache).logits[0, -1].float()
        return cache, logits

    @staticmethod
    def full_cache(base):
        cache = transformers.DynamicCache()
        for index, layer in enumerate(base.layers):
            cache.update(layer.keys.clone(), layer.values.clone(), index)
        return cache

    @torch.no_grad()
    def feed(self, cache, ids):
        """One forward per token; returns the logits after each, and seconds per token."""
        out = []
        start = time.perf_counter()
        for token in ids:
            out.append(self.model(torch.tensor([[token]], device=self.device), past_key_values=cache).logits[0, -1].float())
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return out, (time.perf_counter() - start) / max(1, len(ids))

    def caches(self, base, plans):
        methods = self.args.methods.split(",")
        if "full" in methods:
            yield "full", self.full_cache(base)
        for name in METHODS[1:4]:
            if name in methods:
                yield name, base.fork(plans[name])
        if self.args.compare_prefetch:
            yield "summary-noreport", base.fork(plans["summary"], report_attention=False)


def nll(first_logits, logits, targets):
    """Mean negative log-likelihood of ``targets``: the first from the prompt's last logits, each
    other from the logits after feeding the target before it."""
    rows = torch.stack([first_logits] + logits)
    return torch.nn.functional.cross_entropy(rows, torch.tensor(targets, device=rows.device)).item()


def run(args):
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    loader = load_smollm2 if args.model == "smollm2" else load_fixture
    model, spec_dtype, encode, decode, limit = loader(dtype)
    model = enable_offload(model.to(device))
    cfg = model.config
    spec = kvtier.ModelSpec(f"offload-bench-{args.model}", layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads,
                            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                            dtype=spec_dtype, page_tokens=args.page)
    contexts = [int(c) for c in args.contexts.split(",")]
    for c in contexts:
        if c + args.continuation > limit:
            raise SystemExit(f"{args.model} takes {limit} positions; context {c} plus {args.continuation} continuation tokens "
                             f"exceed it: measure a shorter context or continuation")
    daemon = None
    socket = args.socket
    if socket is None:
        binary = args.daemon or find_daemon(str(REPO), builds=("release", "debug"))
        if binary is None:
            raise SystemExit("no kvtierd: build it (swift build -c release --product kvtierd) or pass --daemon")
        daemon = LocalDaemon(binary, "--ram-budget", args.ram_budget, prefix="kvtier-offload-bench-")
        socket = daemon.socket
    runner = Runner(args, model, spec, device, dtype)
    report = {"args": vars(args), "nll": [], "passkey": [], "speed": {}}
    docs = [(name, encode(text)) for name, text in documents(args.text_rev)]
    try:
        with kvtier.Client(socket) as client:
            for context in contexts:
                plans = runner.plans(context)
                note(f"context {context}: " + ", ".join(f"{k} attends <= {p.max_attended_tokens} "
                                                          f"(promoted {p.promoted_pages}, fetched {p.fetch_pages})"
                                                          for k, p in plans.items()))
                used = 0
                for name, ids in docs:
                    if used == args.docs or len(ids) < context + args.continuation:
                        continue
                    used += 1
                    prompt, continuation = ids[:context], ids[context:context + args.continuation]
                    t0 = time.perf_counter()
                    base, first = runner.prefill(client, prompt, plans["summary"])
                    prefill_s = time.perf_counter() - t0
                    row = {"context": context, "doc": name, "prefill_seconds": prefill_s, "methods": {}}
                    if args.cold_start:
                        # A later turn: the sequence's pages are in kvtierd already (an earlier turn
                        # put them: one decode step of a throwaway cache does), and on its disk.
                        runner.feed(base.fork(plans["summary"], report_attention=False), continuation[:1])
                    for method, cache in runner.caches(base, plans):
                        if args.cold_start and method.startswith("summary"):
                            move_to_disk(client, spec, prompt)
                        before = client.status()
                        logits, first_step = runner.feed(cache, continuation[:1])
                        early = client.status()
                        more, per_token = runner.feed(cache, continuation[1:-1])
                        logits += more
                        after = client.status()
                        entry = {"nll": nll(first, logits, continuation), "seconds_per_token": per_token,
                                 "first_step_seconds": first_step}
                        if method != "full":
                            entry.update(stats_of(cache, before, after))
                            entry["first_step"] = {k: early.get(k, 0) - before.get(k, 0)
                                                   for k in ("promotions", "prefetch_useful", "prefetch_late", "prefetch_issued")}
                        row["methods"][method] = entry
                    full = row["methods"]["full"]["nll"] if "full" in row["methods"] else math.nan
                    for entry in row["methods"].values():
                        entry["nll_change"] = entry["nll"] / full - 1
                    note(f"  {name}: " + ", ".join(f"{m} {e['nll']:.4f} ({e['nll_change'] * 100:+.2f}%, {1 / e['seconds_per_token']:.1f} tok/s)"
                                                    for m, e in row["methods"].items()))
                    report["nll"].append(row)
                rng = random.Random(args.seed + context)
                for trial in range(args.passkeys):
                    depth = rng.uniform(0.05, 0.95)
                    key = "".join(rng.choice("0123456789") for _ in range(5))
                    haystack, question, answer = passkey_prompt(encode, context, depth, key)
                    base, _ = runner.prefill(client, haystack, plans["summary"])
                    row = {"context": context, "depth": depth, "key": key, "methods": {}}
                    for method, cache in runner.caches(base, plans):
                        logits, _ = runner.feed(cache, question[:-1])
                        out = []
                        with torch.no_grad():
                            step = model(torch.tensor([[question[-1]]], device=device), past_key_values=cache).logits[0, -1]
                            for _ in range(args.answer_tokens):
                                token = int(step.argmax())
                                out.append(token)
                                step = model(torch.tensor([[token]], device=device), past_key_values=cache).logits[0, -1]
                        text = decode(out)
                        row["methods"][method] = {"answer": text, "correct": answer in text}
                    note(f"  passkey {key} at {depth:.2f}: " + ", ".join(f"{m} {'ok' if e['correct'] else repr(e['answer'])}"
                                                                         for m, e in row["methods"].items()))
                    report["passkey"].append(row)
    finally:
        if daemon is not None:
            daemon.stop()
    summarize(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


def move_to_disk(client, spec, tokens):
    """Evicts the cached prefix of ``tokens`` until kvtierd holds none of it in RAM (pages whose
    disk write is still running, or leased by a step just ended, stay on the first try)."""
    deadline = time.monotonic() + 120
    while True:
        client.evict(spec, tokens)
        look = client.lookup_detail(spec, tokens)
        if look.ram_tokens == 0:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"kvtierd still keeps {look.ram_tokens} tokens of the prompt in RAM after 120 s of evictions: "
                             "is its disk full or its disk budget too small for the prompt's pages (kvtier status)?")
        time.sleep(0.05)


def stats_of(cache, before, after):
    s = cache.stats
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    leased = s.pages_leased
    entry = {"attended_max": s.attended_tokens_max, "promotions": s.promotions, "demotions": s.demotions,
             "pages_leased": leased, "lease_requests": s.lease_requests, "pages_fetched": s.pages_fetched,
             "demand_loads": delta.get("promotions", 0), "prefetch_issued": delta.get("prefetch_issued", 0),
             "prefetch_used": delta.get("prefetch_useful", 0), "prefetch_wasted": delta.get("prefetch_wasted", 0)}
    entry["prefetch_late"] = delta.get("prefetch_late", 0)
    if leased:
        # In RAM when the GET came: neither read for it nor still being read by a prefetch.
        entry["in_ram_fraction"] = 1 - (entry["demand_loads"] + entry["prefetch_late"]) / leased
        entry["prefetched_fraction"] = (entry["prefetch_used"] - entry["prefetch_late"]) / leased
    return entry


def summarize(report):
    by = {}
    for row in report["nll"]:
        for method, e in row["methods"].items():
            by.setdefault((row["context"], method), []).append(e)
    keys = {}
    for row in report["passkey"]:
        for method, e in row["methods"].items():
            keys.setdefault((row["context"], method), []).append(e["correct"])
    print("\n| context | method | NLL | change | passkey | decode tok/s | pages leased | in RAM at the GET | there by prefetch | prefetch used / issued |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for context, method in sorted(set(by) | set(keys), key=lambda k: (k[0], METHODS.index(k[1]))):
        entries = by.get((context, method), [])
        found = keys.get((context, method), [])
        if not entries:  # passkeys only (--docs 0)
            print(f"| {context} | {method} | - | - | {sum(found)}/{len(found)} | - | - | - | - | - |")
            continue
        mean = sum(e["nll"] for e in entries) / len(entries)
        change = sum(e["nll_change"] for e in entries) / len(entries)
        speed = len(entries) / sum(e["seconds_per_token"] for e in entries)
        total = lambda key: sum(e.get(key, 0) for e in entries)  # noqa: E731
        leased = total("pages_leased")
        ram = f"{100 * (1 - (total('demand_loads') + total('prefetch_late')) / leased):.1f}%" if leased else "-"
        pre = f"{100 * (total('prefetch_used') - total('prefetch_late')) / leased:.1f}%" if leased else "-"
        accuracy = f"{total('prefetch_used')} / {total('prefetch_issued')}" if total("prefetch_issued") else "-"
        pk = f"{sum(found)}/{len(found)}" if found else "-"
        print(f"| {context} | {method} | {mean:.4f} | {change * 100:+.2f}% | {pk} | {speed:.2f} | {leased or '-'} | {ram} | {pre} | {accuracy} |")


def note(text):
    print(text, file=sys.stderr, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("smollm2", "fixture"), default="smollm2")
    parser.add_argument("--contexts", default="4096,8192")
    parser.add_argument("--budget", type=float, default=0.25, help="fraction of the context a step attends to")
    parser.add_argument("--page", type=int, default=16, help="tokens per page (kvtierd's page size for this model)")
    parser.add_argument("--window-pages", type=int, default=None, help="default: OffloadPlan.for_budget's (budget / 8)")
    parser.add_argument("--promoted-share", type=float, default=0.25)
    parser.add_argument("--dense-layers", type=int, default=0,
                        help="summary: this many first layers attend to the whole context, the others share the rest")
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--methods", default="full,window,promote,summary",
                        help="which to run (NLL changes need full)")
    parser.add_argument("--docs", type=int, default=2, help="documents per context")
    parser.add_argument("--passkeys", type=int, default=8, help="passkey trials per context")
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--text-rev", default="ffd2702", help="commit whose docs/ are the texts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--ram-budget", default="4GiB", help="kvtierd's RAM budget (small: pages go to disk)")
    parser.add_argument("--cold-start", action="store_true",
                        help="summary methods start with every page of the prompt on kvtierd's disk (a later turn)")
    parser.add_argument("--compare-prefetch", action="store_true",
                        help="also run the summary method without ATTENTION reports (no prefetch)")
    parser.add_argument("--daemon", help="kvtierd binary (default: .build/release, then debug)")
    parser.add_argument("--socket", help="a running kvtierd instead of one of our own")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    run(args)


if __name__ == "__main__":
    main()
