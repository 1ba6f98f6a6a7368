#!/usr/bin/env python3
"""How the attention-weighted offload's budget split and page size move its quality: one prefill
per document, then each plan decodes the same continuation (teacher-forced) at the same budget.
This is how offload_quality.py's defaults were chosen; docs/attention-offload.md cites its output.

    python3 Benchmarks/offload/explore_plans.py --model smollm2 --context 4096 --continuation 128 \\
        --docs 2 --plans "32:8:0.25,32:8:0,32:4:0.25,16:16:0.25,16:8:0.25,64:4:0.25"

A plan is ``page:window_pages:promoted_share[:dense_layers]`` (mode "summary"); "window" and "promote" add the
baselines at the plan's page size. Every plan attends to at most ``--budget`` of the context.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import offload_quality as oq  # noqa: E402
import torch  # noqa: E402

import kvtier  # noqa: E402
from kvtier.local_daemon import LocalDaemon, find_daemon  # noqa: E402
from kvtier.offload import OffloadPlan  # noqa: E402
from kvtier.transformers import OffloadedCache, enable_offload  # noqa: E402


def parse(plans: str, budget: int, layers: int, context: int):
    out = []
    for item in plans.split(","):
        if item in ("window", "promote"):
            out.append((item, None))
            continue
        page, window, share, *dense = item.split(":")
        extra = dict(dense_layers=int(dense[0]), layers=layers, context_tokens=context) if dense else {}
        out.append((item, OffloadPlan.for_budget(budget, int(page), "summary", window_pages=int(window), promoted_share=float(share),
                                                 **extra)))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "fixture"), default="smollm2")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--docs", type=int, default=1)
    parser.add_argument("--plans", default="32:8:0.25,32:8:0,32:4:0.25,16:16:0.25,16:8:0.25,64:4:0.25,window,promote")
    parser.add_argument("--baseline-page", type=int, default=32, help="page size of the window and promote baselines")
    parser.add_argument("--text-rev", default="ffd2702")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--daemon")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loader = oq.load_smollm2 if args.model == "smollm2" else oq.load_fixture
    model, spec_dtype, encode, _, _ = loader(torch.float32)
    model = enable_offload(model)
    cfg = model.config
    budget = int(args.context * args.budget)
    plans = parse(args.plans, budget, cfg.num_hidden_layers, args.context)
    for name, plan in plans:
        if plan is None:
            p = args.baseline_page
            plans[plans.index((name, plan))] = (name, OffloadPlan.for_budget(budget, p, name, window_pages=8))
    binary = args.daemon or oq.find_daemon(str(oq.REPO), builds=("release", "debug"))
    daemon = LocalDaemon(binary, "--ram-budget", "4GiB", prefix="kvtier-offload-explore-")

    def spec(page):
        return kvtier.ModelSpec(f"offload-explore-{args.model}-{page}", layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads,
                                head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                                dtype=spec_dtype, page_tokens=page)

    results = {name: [] for name, _ in plans}
    try:
        with kvtier.Client(daemon.socket) as client:
            used = 0
            for doc, text in oq.documents(args.text_rev):
                ids = encode(text)
                if used == args.docs or len(ids) < args.context + args.continuation:
                    continue
                used += 1
                prompt, continuation = ids[:args.context], ids[args.context:args.context + args.continuation]
                bases = {}
                full = None
                for name, plan in plans:
                    if plan.page_tokens not in bases:
                        cache = OffloadedCache(client, spec(plan.page_tokens), plan, query_heads=cfg.num_attention_heads,
                                               dtype=torch.float32)
                        with torch.no_grad():
                            first = model(torch.tensor([prompt]), past_key_values=cache).logits[0, -1].float()
                        bases[plan.page_tokens] = (cache, first)
                    base, first = bases[plan.page_tokens]
                    runner = oq.Runner(args, model, spec(plan.page_tokens), torch.device("cpu"), torch.float32)
                    if full is None:
                        logits, _ = runner.feed(runner.full_cache(base), continuation[:-1])
                        full = oq.nll(first, logits, continuation)
                        print(f"{doc}: full {full:.4f}", flush=True)
                    start = time.perf_counter()
                    cache = base.fork(plan)
                    logits, per_token = runner.feed(cache, continuation[:-1])
                    value = oq.nll(first, logits, continuation)
                    results[name].append(value / full - 1)
                    mean = cache.stats.attended_tokens_sum / max(1, cache.stats.attended_layer_steps)
                    print(f"  {name:>14} attends <= {plan.max_attended_tokens:5d} (mean {mean:.0f}): NLL {value:.4f} ({(value / full - 1) * 100:+.2f}%) "
                          f"{time.perf_counter() - start:.0f} s, promoted {plan.promoted_pages} fetched {plan.fetch_pages}", flush=True)
    finally:
        daemon.stop()
    print("\n| plan | max attended | NLL change (mean over docs) |\n| --- | ---: | ---: |")
    for name, plan in plans:
        if results[name]:
            print(f"| {name} | {plan.max_attended_tokens} | {sum(results[name]) / len(results[name]) * 100:+.2f}% |")


if __name__ == "__main__":
    main()
