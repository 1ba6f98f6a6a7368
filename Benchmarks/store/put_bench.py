"""Steady-state PUT through the Python client, and durable puts, against same-run baselines
(issue 12's store targets; the Swift counterpart is `kvtier bench put`).

    PYTHONPATH=clients/python/src python3 Benchmarks/store/put_bench.py [--daemon PATH]
        [--prefix-pages 64] [--puts 16] [--full-budget-prefixes 4] [--durable-pages 16 64]
        [--durable-repetitions 8] [--disk-codec k4v4] [--scenarios fits full durable]
        [--layers 1 --kv-heads 8 --head-dim 128 --page-tokens 256] [--json OUT]

Starts a kvtierd of its own per configuration (a temporary socket and state directory, the RAM
budget and disk codec as flags; ready once it sends READY=1 on a NOTIFY_SOCKET, as the test
suite's conftest.py does) and puts prefixes of ``--prefix-pages`` pages (``layers × [page_tokens,
kv_heads, head_dim]`` float16 keys and values: 1 MiB per page by default) with ``Client.put``
over shared memory:

- ``fits``: a RAM budget that holds every timed put. Warm-up fills it once and deletes those pages
  (``evict(delete=True)``), so the timed puts land in page-arena memory committed already, as in
  a daemon that has run a while; nothing may be evicted meanwhile.
- ``full``: a RAM budget of ``--full-budget-prefixes`` prefixes, filled (and passed by one) first,
  so every timed put evicts older pages to the disk tier.

Both against ``numpy.copyto`` of a prefix's bytes between two arrays touched beforehand (median
of 10, just before the timed puts). Throughput is bytes over the span of the timed puts.

- ``durable``: for each page count, ``--durable-repetitions`` rounds (after one untimed) of a plain
  put, a durable put and a session put, each of a fresh prefix of that many pages, and a plain
  ``os.pwrite`` of the bytes the durable put added to the disk tier (``disk_live_bytes``) at the
  end of a file in the daemon's state directory plus one ``os.fdatasync``. Pages and session are
  deleted between rounds. Ratios are of medians.

Prints one JSON object (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(REPO, "clients", "python", "src"))

import numpy as np  # noqa: E402

import kvtier  # noqa: E402
from kvtier.local_daemon import LocalDaemon, find_daemon  # noqa: E402

SCENARIOS = ("fits", "full", "durable")


def default_daemon() -> str | None:
    """``$KVTIER_DAEMON``, else this checkout's release kvtierd, else its debug one."""
    return find_daemon(REPO, builds=("release", "debug"))


class Daemon(LocalDaemon):
    """A kvtierd in a fresh temporary folder, ready once it sends READY=1."""

    def __init__(self, binary: str, *args: str):
        super().__init__(binary, *args, prefix="kvtier-put-bench-")
        self.state = os.path.join(self.dir, "state")


def percentile(values, q: float) -> float:
    """The ``q``th percentile (0..100) by nearest rank, as the Swift benchmark computes it."""
    if not values:
        return 0.0
    s = sorted(values)
    rank = int(np.ceil(q / 100 * len(s)))
    return s[min(max(rank, 1), len(s)) - 1]


def numpy_copy_seconds(nbytes: int, repetitions: int = 10) -> float:
    """Median seconds of ``np.copyto`` of ``nbytes`` between two arrays touched beforehand."""
    src = np.full(nbytes, 0x5A, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    times = []
    for _ in range(repetitions):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return percentile(times, 50)


def load_average():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None


class Bench:
    def __init__(self, args):
        self.args = args
        self.spec = kvtier.ModelSpec("kvtier-put-bench", layers=args.layers, kv_heads=args.kv_heads, head_dim=args.head_dim,
                                     page_tokens=args.page_tokens)
        self.page_bytes = self.spec.bytes_per_token * args.page_tokens
        largest = max([args.prefix_pages] + list(args.durable_pages)) * args.page_tokens
        # Finite fp16 in (-2, 2): a plausible bit pattern, the same for every prefix (pages are
        # keyed by tokens, never by content).
        rng = np.random.default_rng(0x9075)
        shape = (args.layers, largest, args.kv_heads, args.head_dim)
        self.keys = (rng.integers(0, 1 << 16, size=shape, dtype=np.uint16) & 0xBFFF).view(np.float16)
        self.values = (rng.integers(0, 1 << 16, size=shape, dtype=np.uint16) & 0xBFFF).view(np.float16)
        self.next_prefix = 0

    def tokens(self, pages: int, scenario: int) -> np.ndarray:
        """Tokens 0, 1, 2, … with the first two distinct per scenario and prefix: every page key
        hashes the first page, so nothing deduplicates."""
        t = np.arange(pages * self.args.page_tokens, dtype=np.uint32)
        t[0] = 0x7B000000 | scenario
        t[1] = self.next_prefix
        self.next_prefix += 1
        return t

    def timed_put(self, client, tokens, **kw) -> float:
        n = len(tokens)
        start = time.perf_counter()
        cached = client.put(self.spec, tokens, self.keys[:, :n], self.values[:, :n], **kw)
        seconds = time.perf_counter() - start
        if cached != n:
            raise RuntimeError(f"a put of {n} tokens left {cached} cached")
        return seconds

    def daemon(self, ram_budget: int):
        return Daemon(self.args.daemon, "--ram-budget", str(ram_budget), "--disk-codec", self.args.disk_codec,
                      "--log-level", "warning")

    def client(self, d: Daemon):
        c = kvtier.Client(d.socket, client_name="kvtier-put-bench-python")
        if not c.shared_memory:
            c.close()
            raise RuntimeError(f"no shared memory with kvtierd: {c.shared_memory_unavailable_reason}")
        c.register(self.spec)
        return c

    def ram_phase(self, name: str) -> dict:
        a = self.args
        prefix_bytes = a.prefix_pages * self.page_bytes
        # fits: room for every timed put and one prefix more; full: filled and passed first.
        budget = (a.puts + 1) * prefix_bytes if name == "fits" else a.full_budget_prefixes * prefix_bytes
        scenario = 1 if name == "fits" else 2
        d = self.daemon(budget)
        try:
            with self.client(d) as c:
                warmup = a.puts if name == "fits" else a.full_budget_prefixes + 1
                for _ in range(warmup):
                    self.timed_put(c, self.tokens(a.prefix_pages, scenario))
                if name == "fits":
                    c.evict(self.spec, delete=True)  # the page arena stays committed
                copy = numpy_copy_seconds(prefix_bytes)
                evictions_before = c.status()["evictions"]
                latencies = []
                start = time.perf_counter()
                for _ in range(a.puts):
                    latencies.append(self.timed_put(c, self.tokens(a.prefix_pages, scenario)))
                seconds = time.perf_counter() - start
                evictions = c.status()["evictions"] - evictions_before
        finally:
            d.stop()
        nbytes = a.puts * prefix_bytes
        gbps = nbytes / seconds / 1e9
        copy_gbps = prefix_bytes / copy / 1e9
        return dict(configuration=name, ramBudgetBytes=budget, warmupPuts=warmup, puts=a.puts, bytes=nbytes, seconds=seconds,
                    gbps=gbps, p50Millis=percentile(latencies, 50) * 1e3, p99Millis=percentile(latencies, 99) * 1e3,
                    numpyCopyGBps=copy_gbps, vsNumpyCopy=gbps / copy_gbps, evictions=evictions)

    def durable_phase(self) -> list:
        a = self.args
        largest = max(a.durable_pages)
        d = self.daemon(4 * largest * self.page_bytes)  # a round's three puts fit: nothing is evicted
        results = []
        try:
            with self.client(d) as c:
                path = os.path.join(d.state, "raw-write-baseline")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                end = 0
                raw = np.random.default_rng(0xD15C).integers(0, 1 << 63, size=largest * self.page_bytes // 8, dtype=np.uint64)
                raw = memoryview(raw).cast("B")
                try:
                    for pages in a.durable_pages:
                        plain, durable, session, write_sync, encoded = [], [], [], [], []
                        for rnd in range(a.durable_repetitions + 1):
                            p = self.timed_put(c, self.tokens(pages, 3))
                            live_before = c.status()["disk_live_bytes"]
                            dur = self.timed_put(c, self.tokens(pages, 3), durable=True)
                            added = c.status()["disk_live_bytes"] - live_before
                            if added <= 0:
                                raise RuntimeError(f"a durable put of {pages} pages added no bytes to the disk tier "
                                                   f"(disk_live_bytes +{added}); is this kvtierd running without a disk tier?")
                            name = f"put-bench-{pages}-{rnd}"
                            ses = self.timed_put(c, self.tokens(pages, 3), session=name)
                            t = time.perf_counter()
                            # The same number of bytes as the put added (headers make that more than
                            # the raw page bytes with an fp16 codec): `raw` is written round and round.
                            written = 0
                            while written < added:
                                at = written % len(raw)
                                n = os.pwrite(fd, raw[at:at + min(len(raw) - at, added - written)], end + written)
                                if n <= 0:
                                    raise RuntimeError(f"pwrite wrote nothing at offset {end + written} of {path}")
                                written += n
                            os.fdatasync(fd)
                            ws = time.perf_counter() - t
                            end += added
                            c.delete_session(name)
                            c.evict(self.spec, delete=True)
                            if rnd == 0:
                                continue  # the first round warms the arena, the segment and the file
                            plain.append(p)
                            durable.append(dur)
                            session.append(ses)
                            write_sync.append(ws)
                            encoded.append(added)
                        w50 = percentile(write_sync, 50)
                        results.append(dict(
                            pages=pages, repetitions=a.durable_repetitions, encodedBytes=int(percentile(encoded, 50)),
                            plainP50Millis=percentile(plain, 50) * 1e3, plainP99Millis=percentile(plain, 99) * 1e3,
                            durableP50Millis=percentile(durable, 50) * 1e3, durableP99Millis=percentile(durable, 99) * 1e3,
                            sessionP50Millis=percentile(session, 50) * 1e3, sessionP99Millis=percentile(session, 99) * 1e3,
                            writeSyncP50Millis=w50 * 1e3, writeSyncP99Millis=percentile(write_sync, 99) * 1e3,
                            durableVsWriteSync=percentile(durable, 50) / w50, sessionVsWriteSync=percentile(session, 50) / w50))
                finally:
                    os.close(fd)
        finally:
            d.stop()
        return results

    def run(self) -> dict:
        a = self.args
        load_start = load_average()
        ram = [self.ram_phase(name) for name in ("fits", "full") if name in a.scenarios]
        durable = self.durable_phase() if "durable" in a.scenarios and a.durable_pages else []
        return dict(model=f"{a.layers}×[{a.page_tokens}, {a.kv_heads}, {a.head_dim}] float16 per page",
                    pageTokens=a.page_tokens, pageBytes=self.page_bytes, prefixPages=a.prefix_pages,
                    prefixBytes=a.prefix_pages * self.page_bytes, diskCodec=a.disk_codec, ram=ram, durable=durable,
                    cpuCores=os.cpu_count(), loadAverageStart=load_start, loadAverageEnd=load_average(),
                    numpy=np.__version__, python=sys.version.split()[0], daemon=a.daemon)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--daemon", default=default_daemon(), help="kvtierd binary (default: KVTIER_DAEMON, else .build/release, .build/debug)")
    p.add_argument("--prefix-pages", type=int, default=64, help="pages per RAM-tier put")
    p.add_argument("--puts", type=int, default=16, help="timed puts per RAM-tier configuration")
    p.add_argument("--full-budget-prefixes", type=int, default=4, help="RAM budget of the 'full' configuration, in prefixes")
    p.add_argument("--durable-pages", type=int, nargs="*", default=[16, 64], help="page counts of the durable puts")
    p.add_argument("--durable-repetitions", type=int, default=8, help="timed rounds per durable page count")
    p.add_argument("--disk-codec", default="k4v4", help="the daemon's --disk-codec")
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-tokens", type=int, default=256)
    p.add_argument("--json", help="also write the report to this file")
    args = p.parse_args(argv)
    if not args.daemon or not os.access(args.daemon, os.X_OK):
        p.error("no kvtierd: build it (swift build -c release --product kvtierd), set KVTIER_DAEMON or pass --daemon PATH")
    for name in ("prefix_pages", "puts", "full_budget_prefixes", "durable_repetitions", "layers", "kv_heads", "head_dim", "page_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if any(n < 1 for n in args.durable_pages):
        p.error("--durable-pages must be positive page counts")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    report = Bench(args).run()
    text = json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
