#!/usr/bin/env python3
"""Time to first token through kvtierd: a prompt's prefix restored from the VRAM tier, the
daemon's RAM tier or its disk tier (kvtier.transformers.KVTierCache: lookup + get, host to
device, or VRAM_LEASE + device-to-device copies; then the last prompt token computed) versus the
whole prompt recomputed.

    python3 Benchmarks/gpu/daemon_ttft.py --daemon .device/bin/kvtierd --out ttft.json
    python3 Benchmarks/gpu/daemon_ttft.py --daemon .build/debug/kvtierd --smoke    # CPU, tiny

Default: a Llama-3-8B-shaped LlamaForCausalLM (32 layers, hidden 4096, 32 heads, 8 KV heads,
vocab 128256; random bf16 weights: speed only) on CUDA, prompts of 4K, 16K and 32K tokens.
Per length: recompute (one forward over the prompt, `logits_to_keep=1`, median of --repeats after
a warm-up), whose KV is then stored in kvtierd (durable put) and placed in a VRAM pool of this
process (kvtier.vram.VramTier, as an engine's save would); RAM-tier restore (same daemon, the
pages resident); VRAM-tier restore (the pool's slots copied device to device); disk-tier restore (kvtierd stopped with SIGTERM and started again on the same
state directory before each repeat, so RAM is empty; with --drop-caches, as root, the kernel's
page cache is dropped too, so the page files are read from the device). Each restored path's
logits are compared with the recompute's. `--smoke` runs a 2-layer model on CPU at 64 and 200
tokens, so the script is exercised by the test suite (clients/python/tests/test_daemon_ttft.py).

Needs torch, transformers >= 4.56, the kvtier package (pip install ./clients/python) and a
kvtierd binary. JSON report to --out; a Markdown table on stdout.
"""
import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "clients", "python", "src"))  # this checkout's kvtier first

import kvtier  # noqa: E402
from kvtier.transformers import KVTierCache  # noqa: E402
from kvtier.vram import VramTier  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)
SMOKE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024, rope_theta=500000.0)


class Daemon:
    """kvtierd on a private socket and state directory; restart keeps the state directory."""

    def __init__(self, binary, extra_args):
        self.dir = tempfile.mkdtemp(prefix="kvtier-ttft-")
        self.socket = os.path.join(self.dir, "kvtierd.sock")
        self.log_path = os.path.join(self.dir, "kvtierd.log")
        self.argv = [binary, "--socket", self.socket, "--state-dir", os.path.join(self.dir, "state"), *extra_args]
        self.proc = None
        self.start()

    def start(self):
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                with open(self.log_path) as f:
                    sys.exit(f"kvtierd did not start:\n{f.read()[-3000:]}")
            time.sleep(0.02)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.exists(self.socket):
            os.unlink(self.socket)

    def restart(self):
        self.stop()
        self.start()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def drop_page_cache():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")


def last_logits(model, ids, cache):
    return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1].float()


def measure(args, model, spec, device, dtype, tokens, daemon):
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=gen).to(device)
    row = {"tokens": tokens}

    recompute = []
    # The VRAM tier: a pool in this process, filled by the save below (as an engine's prefill
    # would); its restores are device-to-device copies after a VRAM_LEASE.
    vclient = kvtier.Client(daemon.socket)
    tier = VramTier(vclient)
    tier.create_pool(device, -(-tokens // (spec.page_tokens or 256)), model=spec)
    with kvtier.Client(daemon.socket) as client:
        for i in range(args.repeats + 1):  # the first is a warm-up
            cache = KVTierCache(client, spec, dtype=dtype, device=device, durable=True, vram=tier)
            sync(device)
            t0 = time.perf_counter()
            reference = last_logits(model, ids, cache)
            sync(device)
            if i:
                recompute.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cache.save(ids)
        row["putSeconds"] = time.perf_counter() - t0
        row["kvBytes"] = tokens * spec.bytes_per_token
        del cache

    def restored_ttft(client, expect_tier, vram=None):
        cache = KVTierCache(client, spec, dtype=dtype, device=device, vram=vram)
        sync(device)
        t0 = time.perf_counter()
        n = cache.restore(ids)
        sync(device)
        t1 = time.perf_counter()
        logits = last_logits(model, ids[:, n:], cache)
        sync(device)
        t2 = time.perf_counter()
        look = cache.kvtier.last_lookup
        tier_tokens = {"ram": look.ram_tokens, "disk": look.disk_tokens, "vram": look.vram_tokens}[expect_tier]
        served_by = "vram" if expect_tier == "vram" else "daemon"
        if n != tokens - 1 or tier_tokens != tokens or cache.restored_from != served_by:
            sys.exit(f"{tokens} tokens, {expect_tier} tier: restored {n}, lookup {look}")
        diff = float((logits - reference).abs().max())
        return t2 - t0, t1 - t0, diff

    ram, vram, disk = [], [], []
    with kvtier.Client(daemon.socket) as client:
        for i in range(args.repeats + 1):
            r = restored_ttft(client, "ram")
            if i:
                ram.append(r)
        for i in range(args.repeats + 1):
            r = restored_ttft(client, "vram", vram=tier)
            if i:
                vram.append(r)
    tier.close()
    vclient.close()
    for i in range(args.repeats):
        daemon.restart()
        if args.drop_caches:
            drop_page_cache()
        with kvtier.Client(daemon.socket) as client:
            disk.append(restored_ttft(client, "disk"))

    rec = statistics.median(recompute)
    row["recomputeSeconds"] = rec
    row["recomputeSecondsAll"] = recompute
    for name, runs in (("ram", ram), ("vram", vram), ("disk", disk)):
        ttft = statistics.median(r[0] for r in runs)
        row[name] = {"ttftSeconds": ttft, "restoreSeconds": statistics.median(r[1] for r in runs),
                     "ratioToRecompute": ttft / rec, "maxLogitDiff": max(r[2] for r in runs),
                     "ttftSecondsAll": [r[0] for r in runs]}
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--daemon", default=os.environ.get("KVTIER_DAEMON", ".device/bin/kvtierd"), help="kvtierd binary")
    ap.add_argument("--tokens", default="4096,16384,32768", help="comma-separated prompt lengths")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per length and path (median reported)")
    ap.add_argument("--disk-codec", default="k4v4", help="kvtierd --disk-codec (k4v4 default, fp16 lossless)")
    ap.add_argument("--ram-budget", default="", help="kvtierd --ram-budget (default: twice the largest prompt's KV)")
    ap.add_argument("--drop-caches", action="store_true", help="drop the page cache before each disk restore (root)")
    ap.add_argument("--smoke", action="store_true", help="2-layer model on CPU at 64 and 200 tokens, 1 repeat")
    ap.add_argument("--out", help="write the JSON report here")
    args = ap.parse_args()

    import transformers

    if args.smoke:
        shape, device, dtype, store = SMOKE, torch.device("cpu"), torch.float32, "float16"
        args.tokens, args.repeats = "64,200", 1
    else:
        if not torch.cuda.is_available():
            sys.exit("daemon_ttft.py needs a CUDA GPU (or --smoke for a CPU run with a tiny model)")
        shape, device, dtype, store = LLAMA3_8B, torch.device("cuda"), torch.bfloat16, "bfloat16"
    lengths = [int(t) for t in args.tokens.split(",") if t]

    cfg = transformers.LlamaConfig(**shape)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with device:
        model = transformers.LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    spec = kvtier.ModelSpec("daemon-ttft-" + ("smoke" if args.smoke else "llama3-8b-shape"), layers=cfg.num_hidden_layers,
                            kv_heads=cfg.num_key_value_heads, head_dim=head_dim, dtype=store,
                            rope_theta=cfg.rope_theta if hasattr(cfg, "rope_theta") else 500000.0)
    budget = args.ram_budget or f"{max(64, 2 * max(lengths) * spec.bytes_per_token >> 20)}MiB"
    daemon = Daemon(args.daemon, ["--disk-codec", args.disk_codec, "--ram-budget", budget])
    report = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "smoke": args.smoke, "model": shape, "dtype": str(dtype), "storedDtype": store, "diskCodec": args.disk_codec,
        "ramBudget": budget, "repeats": args.repeats, "dropCaches": args.drop_caches, "rows": [],
    }
    try:
        with torch.inference_mode():
            for n in lengths:
                row = measure(args, model, spec, device, dtype, n, daemon)
                report["rows"].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        daemon.stop()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    tiers = (("vram", "VRAM tier"), ("ram", "RAM tier"), ("disk", f"disk tier ({args.disk_codec})"))
    print("| tokens | recompute | " + " | ".join(f"{label}: TTFT (restore) | ratio" for _, label in tiers) + " |")
    print("| ---: | ---: | " + " | ".join("---: | ---:" for _ in tiers) + " |")
    for r in report["rows"]:
        cells = [f"{r[k]['ttftSeconds'] * 1e3:.1f} ms ({r[k]['restoreSeconds'] * 1e3:.1f} ms) | {r[k]['ratioToRecompute']:.3f}"
                 for k, _ in tiers]
        print(f"| {r['tokens']} | {r['recomputeSeconds'] * 1e3:.1f} ms | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
