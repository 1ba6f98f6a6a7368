#!/usr/bin/env python3
"""Recompute (prefill) versus restore from the disk tier, from the JSON of `prefill.py` and of
`kvtier bench disk --json` (one file per codec).

    python3 Benchmarks/gpu/compare.py --prefill prefill.json disk-k4v4.json disk-fp16.json ...

For each prompt length n with KV size B (fp16 bytes of the whole cache):
    disk restore  = B / restoreFp16GBps                (disk tier: read, CRC, decode to host RAM)
    H2D           = pinned host-to-device copy of B     (measured by prefill.py)
    restore total = disk restore + H2D                  (serial: no overlap of the two assumed)
    ratio         = restore total / prefill time        (issue goal at 16K: disk <= 0.5x)
Several reports of one codec and I/O path (repeated runs) are combined: the median of their
restoreFp16GBps is used, and the ratio's range over the runs is printed beside it.
Also printed: the overlapped bound max(disk restore, H2D) and the pinned-H2D-only ratio, which
is a floor for any tier that has to cross PCIe (the RAM tier's goal at 16K is <= 0.25x).
"""
import argparse
import json
import statistics
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill", required=True)
    ap.add_argument("disk", nargs="+", help="kvtier bench disk --json outputs")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    pre = json.load(open(args.prefill))
    disks = []
    for path in args.disk:
        try:
            d = json.load(open(path))
        except (OSError, json.JSONDecodeError) as e:
            print(f"skipping {path}: {e}", file=sys.stderr)
            continue
        disks.append(d)
    groups = {}
    for d in disks:
        groups.setdefault((d["codec"], d.get("ioPath", "?")), []).append(d)
    h2d = {h["tokens"]: h for h in pre["h2d"]}
    rows = []
    for p in pre["prefill"]:
        n = p["tokens"]
        b = p["kvCacheBytes"]
        h = h2d[n]
        for (codec, io), ds in sorted(groups.items()):
            runs = [d["restoreFp16GBps"] for d in ds]
            gbps = statistics.median(runs)
            disk_s = b / (gbps * 1e9)
            total = disk_s + h["pinnedSeconds"]
            ratios = [(b / (g * 1e9) + h["pinnedSeconds"]) / p["prefillSecondsMedian"] for g in runs]
            rows.append({
                "tokens": n,
                "kvBytes": b,
                "codec": codec if io == "io_uring" else f"{codec} ({io})",
                "runs": len(runs),
                "prefillSeconds": p["prefillSecondsMedian"],
                "restoreFp16GBps": gbps,
                "restoreFp16GBpsRuns": runs,
                "rawReadGBps": statistics.median(d["rawReadGBps"] for d in ds),
                "ratioMin": min(ratios),
                "ratioMax": max(ratios),
                "diskRestoreSeconds": disk_s,
                "pinnedH2DSeconds": h["pinnedSeconds"],
                "pageableH2DSeconds": h["pageableSeconds"],
                "restoreTotalSeconds": total,
                "ratio": total / p["prefillSecondsMedian"],
                "ratioOverlapped": max(disk_s, h["pinnedSeconds"]) / p["prefillSecondsMedian"],
                "ratioH2DOnly": h["pinnedSeconds"] / p["prefillSecondsMedian"],
                "ratioWithPageableH2D": (disk_s + h["pageableSeconds"]) / p["prefillSecondsMedian"],
            })
    print("| tokens | KV fp16 | prefill s | codec | runs | restore GB/s | disk restore s | pinned H2D s | restore+H2D s | ratio | range over runs | overlapped | H2D only |")
    print("| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['tokens']} | {r['kvBytes'] / 2**30:.2f} GiB | {r['prefillSeconds']:.3f} | {r['codec']} | {r['runs']} | {r['restoreFp16GBps']:.2f} | "
              f"{r['diskRestoreSeconds']:.3f} | {r['pinnedH2DSeconds']:.3f} | {r['restoreTotalSeconds']:.3f} | "
              f"**{r['ratio']:.2f}×** | {r['ratioMin']:.2f}–{r['ratioMax']:.2f}× | {r['ratioOverlapped']:.2f}× | {r['ratioH2DOnly']:.3f}× |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
