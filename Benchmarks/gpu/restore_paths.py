#!/usr/bin/env python3
"""Restore paths into GPU memory for a Llama-3-8B-shaped KV (32 layers, 8 KV heads, head_dim
128, bf16; 16K tokens = 2 GiB), each timed against a copy floor measured in the same run:

- ``ramPinned``: kvtierd's RAM tier through ``kvtier.torch.get_tensors`` (one contiguous
  host-to-device copy per page from the shared arena, registered with CUDA chunk by chunk,
  then keys and values laid out on the GPU). The first restore pays the registration; it is
  reported apart (``ramPinnedFirstSeconds``).
- ``ramPageable``: the same with ``pin=False`` (the driver stages every page through its own
  pinned buffer).
- ``quantized``: for each codec (k4v4, tq4), the page sections as kvtierd encodes them
  (``kvtier codec roundtrip --out-encoded``, the C encoder) in pinned host memory: host-to-device
  copy of those bytes, then ``kvtier.dequant.decode_sections`` on the GPU into bf16
  ``[layers, tokens, kv_heads, head_dim]``. The GPU's output is checked bit for bit against the
  C decoder's for layer 0. This is the transfer a RAM tier holding quantized pages would make;
  kvtierd's RAM tier holds decoded pages today, so it is the kernel and PCIe half of that path.
- ``diskEvicted``: the prefix evicted from RAM (``EVICT``; the page cache dropped as root)
  before each repeat, restored on the same connection, whose arena the first restore registered
  with CUDA: the disk tier as a long-running engine meets it.
- ``disk``: kvtierd restarted on its state directory (RAM tier empty; ``--drop-caches`` as root
  empties the page cache too), then ``get_tensors`` again: disk read, decode, copy.
- ``vram``: the VRAM tier's restore. This process puts every page in a ``kvtier.vram.VramPool``
  (one GPU allocation of page slots); a second process attaches it through CUDA IPC and
  restores the prefix with ``restore_pages`` (one device-to-device copy per page and half into
  ``[layers, tokens, kv_heads, head_dim]``), timed there; ``vramSameProcess`` is the pool
  owner's own restore. The bytes are checked by checksums on both sides. kvtierd does not
  take part (no directory lookup): the copy half of a VRAM-tier restore.
- ``vramDaemon``: the same through kvtierd's directory: this process registers a pool and places
  the prefix (``kvtier.vram.VramTier.place``, timed as ``placeSeconds``); the second process
  calls ``VramTier.restore``: ``VRAM_LEASE`` (where the pages are), the pool attached once (the
  first restore, ``otherProcessFirstSeconds``), device-to-device copies, ``RELEASE``.
- Floors: ``h2dPinned`` (the KV's bytes from a pinned buffer), ``h2dPageable``, ``d2d`` (a
  device-to-device copy of the KV in one call: the floor of restoring from the VRAM tier).

With ``--prefill prefill.json`` (from ``prefill.py``) each path gets its ratio to recompute.

    python3 Benchmarks/gpu/restore_paths.py --daemon .device/bin/kvtierd --kvtier .device/bin/kvtier --out r.json
    python3 Benchmarks/gpu/restore_paths.py --smoke      # CPU, small shape: exercises every path

JSON to ``--out``, a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "clients", "python", "src"))

import kvtier  # noqa: E402
from kvtier import dequant, vram  # noqa: E402
from kvtier.local_daemon import LocalDaemon, find_daemon  # noqa: E402
from kvtier.torch import get_tensors, pin_page_arena, put_tensors  # noqa: E402

LLAMA = dict(layers=32, kv_heads=8, head_dim=128)
SMOKE = dict(layers=2, kv_heads=2, head_dim=64)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats, warmup=1):
    """Median, min and all of ``repeats`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    times = []
    for i in range(warmup + repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "min": min(times), "all": times}


def find_cli():
    for candidate in (os.environ.get("KVTIER_BIN"), os.path.join(REPO, ".device", "bin", "kvtier"),
                      os.path.join(REPO, ".build", "debug", "kvtier"), os.path.join(REPO, ".build", "release", "kvtier")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def c_encode(cli, codec, keys, values, page_tokens):
    """One layer's keys and values [T, H, D] (bf16 tensors on the CPU) through the C codec:
    (encoded sections of every page, decoded keys bits, decoded values bits)."""
    with tempfile.TemporaryDirectory(prefix="kvtier-restore-") as tmp:
        paths = {n: os.path.join(tmp, f"{n}.npy") for n in ("k", "v", "k2", "v2")}
        np.save(paths["k"], keys.view(torch.int16).numpy().view(np.uint16))
        np.save(paths["v"], values.view(torch.int16).numpy().view(np.uint16))
        encoded = os.path.join(tmp, "encoded.bin")
        env = dict(os.environ, LD_LIBRARY_PATH=os.path.dirname(os.path.abspath(cli)) + ":" + os.environ.get("LD_LIBRARY_PATH", ""))
        r = subprocess.run([cli, "codec", "roundtrip", "--codec", codec, "--keys", paths["k"], "--values", paths["v"],
                            "--out-keys", paths["k2"], "--out-values", paths["v2"], "--page-tokens", str(page_tokens),
                            "--dtype", "bfloat16", "--out-encoded", encoded, "--json"],
                           capture_output=True, text=True, timeout=600, env=env)
        if r.returncode != 0:
            raise SystemExit(f"kvtier codec roundtrip --codec {codec} failed: {r.stderr}")
        with open(encoded, "rb") as f:
            data = f.read()
        return data, np.load(paths["k2"]).view(np.uint16), np.load(paths["v2"]).view(np.uint16)


def measure_quantized(args, cli, codec, keys, values, shape, device, page_tokens):
    """H2D of one codec's sections for every layer and page, then GPU dequant into the layout
    attention uses. Layer 0 comes from the C encoder; the other layers repeat its bytes (the
    cost does not depend on the values)."""
    L, T, H, D = keys.shape
    data, want_k, want_v = c_encode(cli, codec, keys[0], values[0], page_tokens)
    per_page = dequant.section_bytes(codec, page_tokens, H, D)
    pages = T // page_tokens
    if len(data) != pages * per_page:
        raise SystemExit(f"{codec}: {len(data)} encoded bytes for {pages} pages of {per_page}")
    layer0 = torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(pages, 1, per_page)
    host = layer0.expand(pages, L, per_page).contiguous()            # [pages, layers, bytes], page-major as stored
    if device.type == "cuda":
        host = host.pin_memory()
    gpu = torch.empty_like(host, device=device)
    out_k = torch.empty(L, T, H, D, dtype=torch.bfloat16, device=device)
    out_v = torch.empty_like(out_k)

    def restore():
        gpu.copy_(host, non_blocking=True)
        k, v = dequant.decode_sections(codec, gpu, page_tokens, H, D, torch.bfloat16, check=args.check)
        # [pages, layers, page_tokens, H, D] -> [layers, pages * page_tokens, H, D]
        out_k.view(L, pages, page_tokens, H, D).copy_(k.transpose(0, 1))
        out_v.view(L, pages, page_tokens, H, D).copy_(v.transpose(0, 1))

    def copy_only():
        gpu.copy_(host, non_blocking=True)

    row = {"codec": codec, "bytes": host.numel(), "ratioToFp16Bytes": (2 * L * T * H * D * 2) / host.numel()}
    row["restore"] = timed(restore, device, args.repeats)
    row["h2dOnly"] = timed(copy_only, device, args.repeats)
    restore()
    sync(device)
    got_k = out_k[0].cpu().view(torch.int16).numpy().view(np.uint16)
    got_v = out_v[0].cpu().view(torch.int16).numpy().view(np.uint16)
    row["bitExactLayer0"] = bool(np.array_equal(got_k, want_k) and np.array_equal(got_v, want_v))
    if not row["bitExactLayer0"]:
        print(f"{codec}: the GPU decode differs from the C decoder", file=sys.stderr)
    return row


def checksum(keys, values):
    """Two exact integer sums of the KV's 16-bit words (plain, and weighted by position mod 251),
    per layer so the int64 temporaries stay small."""
    total, weighted = 0, 0
    for half in (keys, values):
        for layer in half:
            x = layer.reshape(-1).view(torch.int16).to(torch.int64)
            w = torch.arange(x.numel(), device=x.device, dtype=torch.int64) % 251
            total += int(x.sum())
            weighted += int((x * w).sum())
    return [total, weighted]


def vram_child(args):
    """The second process of the VRAM measurements: restores from the pool the parent made,
    and prints timings and the checksum as JSON. With a ``socket`` in the job, through kvtierd
    (``VramTier.restore``: VRAM_LEASE, attach once, device-to-device copies, RELEASE); else
    from the pool's handle directly."""
    job = json.loads(sys.stdin.read())
    device = torch.device(job["device"])
    spec = kvtier.ModelSpec(**job["spec"])
    if job.get("socket"):
        tokens = job["tokens"]
        with kvtier.Client(job["socket"]) as c, vram.VramTier(c) as tier:
            result = {"lookup": c.lookup_detail(spec, tokens).__dict__}
            t0 = time.perf_counter()
            k, v = tier.restore(spec, tokens, device=device)
            sync(device)
            result["firstSeconds"] = time.perf_counter() - t0   # includes attaching the pool
            result["checksum"] = checksum(k, v)
            result["servedTokens"] = k.shape[1]
            del k, v
            result["restore"] = timed(lambda: tier.restore(spec, tokens, device=device), device, job["repeats"])
            result["stats"] = tier.stats
        print(json.dumps(result))
        return
    with vram.VramPool.attach(job["handle"].encode()) as pool:
        slots, tokens = job["slots"], job["tokens"]
        result = {"attachedOn": str(pool.device)}
        result["restore"] = timed(lambda: vram.restore_pages(pool, slots, spec, tokens, device=device), device,
                                  job["repeats"])
        k, v = vram.restore_pages(pool, slots, spec, tokens, device=device)
        sync(device)
        result["checksum"] = checksum(k, v)
        del k, v
    print(json.dumps(result))


def measure_vram(args, spec, keys, values, device):
    """Pages into a pool here, restored from it in a second process (see the module's doc)."""
    L, T, H, D = keys.shape
    P = args.page_tokens
    pages = -(-T // P)
    with vram.VramPool.create(device, pages, vram.page_bytes(spec)) as pool:
        dk, dv = keys.to(device), values.to(device)
        for i in range(pages):
            vram.store_page(pool, i, spec, dk[:, i * P:(i + 1) * P], dv[:, i * P:(i + 1) * P])
        sync(device)
        want = checksum(dk, dv)
        del dk, dv
        slots = list(range(pages))
        row = {"poolBytes": pool.slots * pool.slot_bytes, "pages": pages}
        row["sameProcess"] = timed(lambda: vram.restore_pages(pool, slots, spec, T), device, args.repeats)
        job = {"handle": pool.handle.to_bytes().decode(), "device": str(device), "slots": slots, "tokens": T,
               "repeats": args.repeats, "spec": dict(name=spec.name, layers=L, kv_heads=H, head_dim=D,
                                                      dtype=spec.dtype, page_tokens=P)}
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--vram-child"], input=json.dumps(job),
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"the VRAM child failed ({r.returncode}): {r.stderr[-2000:]}")
        child = json.loads(r.stdout.strip().splitlines()[-1])
        row["otherProcess"] = child["restore"]
        row["bytesMatch"] = child["checksum"] == want
        if not row["bytesMatch"]:
            raise RuntimeError(f"the VRAM restore in the other process returned different bytes "
                               f"(checksum {child['checksum']} against {want})")
    return row


def measure_vram_daemon(args, socket_path, spec, tokens, keys, values, device):
    """The VRAM tier through kvtierd: this process makes a pool, registers it and places the
    prefix's pages (``VramTier.place``, timed); a second process restores the prefix with
    ``VramTier.restore``, which asks kvtierd where the pages are."""
    L, T, H, D = keys.shape
    pages = -(-T // args.page_tokens)
    with kvtier.Client(socket_path) as c, vram.VramTier(c) as tier:
        tier.create_pool(device, pages, model=spec)
        dk, dv = keys.to(device), values.to(device)
        sync(device)
        t0 = time.perf_counter()
        placed = tier.place(spec, tokens, dk, dv)
        sync(device)
        row = {"placeSeconds": time.perf_counter() - t0, "placedTokens": placed}
        want = checksum(dk, dv)
        del dk, dv
        row["lookupVramTokens"] = c.lookup_detail(spec, tokens).vram_tokens
        job = {"socket": socket_path, "device": str(device), "tokens": tokens, "repeats": args.repeats,
               "spec": dict(name=spec.name, layers=L, kv_heads=H, head_dim=D, dtype=spec.dtype,
                            page_tokens=args.page_tokens)}
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--vram-child"], input=json.dumps(job),
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"the VRAM child failed ({r.returncode}): {r.stderr[-2000:]}")
        child = json.loads(r.stdout.strip().splitlines()[-1])
        row.update(otherProcess=child["restore"], otherProcessFirstSeconds=child["firstSeconds"],
                   servedTokens=child["servedTokens"], childLookup=child["lookup"], childStats=child["stats"])
        row["bytesMatch"] = child["checksum"] == want and child["servedTokens"] == T
        if not row["bytesMatch"]:
            raise RuntimeError(f"the VRAM-tier restore through kvtierd returned different bytes or length "
                               f"({child['servedTokens']} tokens, checksum {child['checksum']} against {want})")
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--daemon", default=os.environ.get("KVTIER_DAEMON"), help="kvtierd binary")
    ap.add_argument("--kvtier", default=None, help="kvtier CLI (the C encoder for the quantized paths)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--page-tokens", type=int, default=256)
    ap.add_argument("--codecs", default="k4v4,tq4")
    ap.add_argument("--disk-codec", default="k4v4")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                    help="validate scales in the GPU decoder (one reduction and sync per call)")
    ap.add_argument("--drop-caches", action="store_true", help="drop the page cache before each disk restore (root)")
    ap.add_argument("--prefill", help="prefill.py's JSON: ratios to recompute at --tokens")
    ap.add_argument("--smoke", action="store_true", help="small shape on the CPU, 1 repeat")
    ap.add_argument("--out", help="write the JSON report here")
    ap.add_argument("--vram-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vram_child:
        return vram_child(args)

    if args.smoke:
        shape, device, args.tokens, args.page_tokens, args.repeats = SMOKE, torch.device("cpu"), 512, 64, 1
    else:
        if not torch.cuda.is_available():
            sys.exit("restore_paths.py needs a CUDA GPU (or --smoke)")
        shape, device = LLAMA, torch.device("cuda")
    daemon_bin = args.daemon or find_daemon(REPO, ("release", "debug"))
    if not daemon_bin:
        sys.exit("no kvtierd: pass --daemon")
    cli = args.kvtier or find_cli()
    L, H, D, T = shape["layers"], shape["kv_heads"], shape["head_dim"], args.tokens
    if T % args.page_tokens:
        sys.exit("--tokens must be a multiple of --page-tokens")
    spec = kvtier.ModelSpec("restore-paths-" + ("smoke" if args.smoke else "llama3-8b-shape"), layers=L, kv_heads=H,
                            head_dim=D, dtype="bfloat16", page_tokens=args.page_tokens)
    kv_bytes = T * spec.bytes_per_token
    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "tokens": T, "shape": shape, "pageTokens": args.page_tokens,
              "kvBytes": kv_bytes, "repeats": args.repeats, "diskCodec": args.disk_codec, "smoke": args.smoke}

    gen = torch.Generator().manual_seed(7)
    keys = torch.randn(L, T, H, D, generator=gen).to(torch.bfloat16)
    values = torch.randn(L, T, H, D, generator=gen).to(torch.bfloat16)
    tokens = list(range(1000, 1000 + T))

    # Floors, on the same bytes.
    host = torch.cat((keys.reshape(-1), values.reshape(-1)))
    pinned = host.pin_memory() if device.type == "cuda" else host.clone()
    on_device = torch.empty_like(host, device=device)
    report["h2dPinned"] = timed(lambda: on_device.copy_(pinned, non_blocking=True), device, args.repeats)
    report["h2dPageable"] = timed(lambda: on_device.copy_(host), device, args.repeats)
    spare = torch.empty_like(on_device)
    report["d2d"] = timed(lambda: spare.copy_(on_device), device, args.repeats)
    del pinned, spare
    try:
        report["vram"] = measure_vram(args, spec, keys, values, device)
    except (RuntimeError, vram.VramError, subprocess.SubprocessError) as e:
        report["vram"] = {"error": str(e)}
        print(f"VRAM tier: {e}", file=sys.stderr)

    budget = f"{max(64, (3 * kv_bytes) >> 20)}MiB"
    daemon = LocalDaemon(daemon_bin, "--ram-budget", budget, "--disk-codec", args.disk_codec, prefix="kvtier-restore-")
    try:
        with kvtier.Client(daemon.socket) as c:
            t0 = time.perf_counter()
            put_tensors(c, spec, tokens, keys, values, durable=True)
            report["putSeconds"] = time.perf_counter() - t0
        try:
            report["vramDaemon"] = measure_vram_daemon(args, daemon.socket, spec, tokens, keys, values, device)
        except (RuntimeError, vram.VramError, kvtier.KVTierError, subprocess.SubprocessError) as e:
            report["vramDaemon"] = {"error": str(e)}
            print(f"VRAM tier through kvtierd: {e}", file=sys.stderr)

        with kvtier.Client(daemon.socket) as c:
            report["pinned"] = pin_page_arena(c) is None
            sync(device)
            t0 = time.perf_counter()
            k, v = get_tensors(c, spec, tokens, device=device)
            sync(device)
            report["ramPinnedFirstSeconds"] = time.perf_counter() - t0
            if not (torch.equal(k.cpu(), keys) and torch.equal(v.cpu(), values)):
                raise SystemExit("the RAM-tier restore returned different bytes")
            del k, v
            report["ramPinned"] = timed(lambda: get_tensors(c, spec, tokens, device=device), device, args.repeats)
        with kvtier.Client(daemon.socket) as c:
            report["ramPageable"] = timed(lambda: get_tensors(c, spec, tokens, device=device, pin=False), device,
                                          args.repeats)

        # Disk tier as a long-running engine meets it: the same connection (its arena registered
        # with CUDA by the first restore), the prefix evicted from RAM to disk before each repeat.
        evicted, served = [], []
        with kvtier.Client(daemon.socket) as c:
            get_tensors(c, spec, tokens, device=device)
            for _ in range(args.repeats):
                c.evict(spec, tokens)
                if args.drop_caches:
                    os.sync()
                    with open("/proc/sys/vm/drop_caches", "w") as f:
                        f.write("1\n")
                before = c.lookup_detail(spec, tokens)
                if before.disk_tokens != T:
                    raise SystemExit(f"evicted disk restore: lookup {before} after EVICT")
                sync(device)
                t0 = time.perf_counter()
                served.append(get_tensors(c, spec, tokens, device=device)[0].shape[1])
                sync(device)
                evicted.append(time.perf_counter() - t0)
        if served != [T] * args.repeats:
            raise SystemExit(f"evicted disk restore served {served} tokens")
        report["diskEvicted"] = {"seconds": statistics.median(evicted), "min": min(evicted), "all": evicted}

        disk = []
        for _ in range(args.repeats):
            daemon.restart()
            if args.drop_caches:
                os.sync()
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("1\n")
            with kvtier.Client(daemon.socket) as c:
                before = c.lookup_detail(spec, tokens)
                sync(device)
                t0 = time.perf_counter()
                k, _ = get_tensors(c, spec, tokens, device=device)
                sync(device)
                disk.append(time.perf_counter() - t0)
                if k.shape[1] != T or before.disk_tokens != T:
                    raise SystemExit(f"disk restore: {k.shape[1]} tokens served, lookup {before}")
                del k
        report["disk"] = {"seconds": statistics.median(disk), "min": min(disk), "all": disk}
    finally:
        daemon.stop()

    report["quantized"] = []
    if cli is None:
        print("no kvtier CLI: the quantized paths are skipped (--kvtier)", file=sys.stderr)
    else:
        for codec in [c for c in args.codecs.split(",") if c]:
            report["quantized"].append(measure_quantized(args, cli, codec, keys, values, shape, device, args.page_tokens))

    prefill = None
    if args.prefill:
        with open(args.prefill) as f:
            for row in json.load(f)["prefill"]:
                if row["tokens"] == T:
                    prefill = row["prefillSecondsMedian"]
    report["prefillSeconds"] = prefill

    rows = [("RAM tier, pinned arena", report["ramPinned"]["seconds"]),
            ("RAM tier, pageable", report["ramPageable"]["seconds"]),
            (f"disk tier ({args.disk_codec}), kvtierd restarted", report["disk"]["seconds"]),
            (f"disk tier ({args.disk_codec}), evicted, same connection", report["diskEvicted"]["seconds"])]
    rows += [(f"{q['codec']} bytes H2D + GPU dequant", q["restore"]["seconds"]) for q in report["quantized"]]
    if "otherProcess" in report["vramDaemon"]:
        rows += [("VRAM tier through kvtierd, other process", report["vramDaemon"]["otherProcess"]["seconds"])]
    if "otherProcess" in report["vram"]:
        rows += [("VRAM pool alone, other process (attached)", report["vram"]["otherProcess"]["seconds"]),
                 ("VRAM pool alone, pool owner", report["vram"]["sameProcess"]["seconds"])]
    rows += [("floor: H2D pinned", report["h2dPinned"]["seconds"]), ("floor: H2D pageable", report["h2dPageable"]["seconds"]),
             ("floor: D2D (VRAM tier)", report["d2d"]["seconds"])]
    report["table"] = [{"path": name, "seconds": s, "GBps": kv_bytes / s / 1e9,
                        "ratioToRecompute": (s / prefill) if prefill else None} for name, s in rows]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    print(f"{T} tokens, {kv_bytes / 2**30:.2f} GiB of KV on {report['device']}" +
          (f"; recompute {prefill * 1e3:.1f} ms" if prefill else ""))
    print("| path | ms | GB/s of bf16 KV | × recompute |")
    print("| --- | ---: | ---: | ---: |")
    for r in report["table"]:
        ratio = f"{r['ratioToRecompute']:.3f}" if r["ratioToRecompute"] is not None else "-"
        print(f"| {r['path']} | {r['seconds'] * 1e3:.1f} | {r['GBps']:.1f} | {ratio} |")
    for q in report["quantized"]:
        print(f"{q['codec']}: {q['bytes'] / 2**20:.0f} MiB moved ({q['ratioToFp16Bytes']:.2f}x fewer than bf16), "
              f"H2D alone {q['h2dOnly']['seconds'] * 1e3:.1f} ms, GPU result bit-exact with the C decoder: {q['bitExactLayer0']}")


if __name__ == "__main__":
    main()
