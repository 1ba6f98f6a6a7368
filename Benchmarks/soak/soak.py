"""Soak test of a real kvtierd: many client processes of two tenants put, get, resume, fork, evict
and delete for a while, some are SIGKILLed mid-request, and every byte served is checked.

    python3 Benchmarks/soak/soak.py [--daemon PATH] [--clients 64] [--duration 600] [--seed N]
                                    [--kill-every 5] [--json OUT]

The daemon runs with a small RAM budget (pages move to disk and back all the time) and the
lossless ``fp16+zstd`` disk codec, so the KV of every token is known exactly: a token's keys and
values are a function of the tokens up to it (a hash chain seeds them), whoever put them. Workers
with odd numbers run as uid 65534 when the script runs as root, so two tenants share the daemon.

The supervisor samples the daemon's resident memory, shared memory, descriptors and threads
every second and kills a random worker (SIGKILL, usually in the middle of a request) every
``--kill-every`` seconds, starting a fresh one in its place. It exits 1 if any byte served was
wrong, a worker met an error that is not an expected answer (a page evicted since LOOKUP, a
budget refusal), the daemon died, or its descriptors and threads did not come back down after the
clients left. It prints one JSON object (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(REPO, "clients", "python", "src"))

import numpy as np  # noqa: E402
import numpy.random  # noqa: E402,F401  (workers that drop to uid 65534 may not be able to import it later)

import kvtier  # noqa: E402
from kvtier.errors import KVTierError  # noqa: E402

MODEL = kvtier.ModelSpec("soak", layers=2, kv_heads=2, head_dim=32, page_tokens=16)
SHARED_PREFIX = 48          # tokens every conversation of a tenant starts with (a shared system prompt)
MAX_TOKENS = 400
NOBODY = 65534
# Counters each worker keeps in shared memory (they survive its SIGKILL).
COUNTERS = ("ops", "puts", "gets", "resumes", "evicts", "forks", "deletes", "bytes_checked", "tokens_served",
            "wrong_bytes", "expected_errors", "unexpected_errors")
# Answers a correct daemon may give under this load: a page evicted or superseded between two
# requests, a budget refusal, a session another request deleted.
EXPECTED_CODES = {"notFound", "overBudget", "invalidArgument", "unavailable"}


def token_rows(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The KV of ``tokens``: row i depends on tokens[:i+1] only, so equal prefixes get equal KV."""
    per_token = MODEL.layers * MODEL.kv_heads * MODEL.head_dim
    keys = np.empty((len(tokens), per_token), np.float16)
    values = np.empty((len(tokens), per_token), np.float16)
    h = b"kvtier-soak"
    for i, t in enumerate(tokens.tolist()):
        h = hashlib.blake2b(h + int(t).to_bytes(4, "little"), digest_size=16).digest()
        rng = np.random.default_rng(int.from_bytes(h, "little"))
        keys[i] = rng.standard_normal(per_token, np.float32).astype(np.float16)
        values[i] = rng.standard_normal(per_token, np.float32).astype(np.float16)
    shape = (len(tokens), MODEL.layers, MODEL.kv_heads, MODEL.head_dim)
    return (keys.reshape(shape).transpose(1, 0, 2, 3).copy(), values.reshape(shape).transpose(1, 0, 2, 3).copy())


class Worker:
    def __init__(self, index: int, socket: str, counters, seed: int, failures: str):
        self.index = index
        self.socket = socket
        self.counters = counters
        self.rng = random.Random(seed)
        self.failures = failures
        tenant_seed = index % 2
        self.prefix = np.random.default_rng(1000 + tenant_seed).integers(0, 50_000, SHARED_PREFIX, dtype=np.uint32)
        self.conversations: list[np.ndarray] = []
        self.sessions: dict[str, np.ndarray] = {}
        # Sessions whose last put failed part way: (sequence before it, the put's tokens).
        self.uncertain: dict[str, tuple] = {}
        self.history: dict[str, list] = {}
        # Session names are this process's own: a worker started in place of a killed one must
        # not race the PUT its predecessor sent just before it died.
        self.name = f"w{index}.{os.getpid()}"
        self.cache: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}

    def count(self, name: str, n: int = 1) -> None:
        i = COUNTERS.index(name)
        # Each worker writes only its own slots, so the array has no lock: a worker SIGKILLed
        # while holding a shared lock would block every other worker for good.
        self.counters[self.index * len(COUNTERS) + i] += n

    def fail(self, what: str) -> None:
        with open(self.failures, "a") as f:
            f.write(f"worker {self.index}: {what}\n")

    def expected(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key = tokens.tobytes()
        if key not in self.cache:
            if len(self.cache) > 64:
                self.cache.clear()
            self.cache[key] = token_rows(tokens)
        return self.cache[key]

    def new_conversation(self) -> np.ndarray:
        if self.conversations and self.rng.random() < 0.5:
            base = self.rng.choice(self.conversations)  # a later turn of an earlier conversation
        else:
            base = self.prefix
        extra = self.rng.randint(1, 96)
        tail = np.array([self.rng.randrange(50_000) for _ in range(extra)], np.uint32)
        return np.concatenate([base, tail])[:MAX_TOKENS]

    def check(self, client, tokens: np.ndarray) -> None:
        keys, values = client.get(MODEL, tokens)
        served = keys.shape[1]
        self.count("gets")
        self.count("tokens_served", served)
        if served == 0:
            return
        want_k, want_v = self.expected(tokens)
        ok = (np.array_equal(keys.view(np.uint16), want_k[:, :served].view(np.uint16))
              and np.array_equal(values.view(np.uint16), want_v[:, :served].view(np.uint16)))
        self.count("bytes_checked", keys.nbytes + values.nbytes)
        if not ok:
            self.count("wrong_bytes")
            self.fail(f"GET of {len(tokens)} tokens served {served} tokens with wrong bytes")

    def step(self, client) -> None:
        op = self.rng.random()
        if op < 0.35 or not self.conversations:
            tokens = self.new_conversation()
            keys, values = self.expected(tokens)
            session = None
            if self.rng.random() < 0.2:
                session = f"{self.name}-{self.rng.randrange(6)}"
            try:
                client.put(MODEL, tokens, keys, values, session=session)
            except KVTierError:
                # A put is several PUT requests when it is long, each setting the session to the
                # tokens it covers: one that failed part way left the session at the old sequence
                # or at a page-aligned prefix of the new one. Either is right; the next resume says which.
                if session:
                    self.uncertain[session] = (self.sessions.get(session), tokens)
                raise
            if session:
                self.sessions[session] = tokens
                self.uncertain.pop(session, None)
                self.history.setdefault(session, []).append(("put", len(tokens)))
            self.conversations.append(tokens)
            self.conversations = self.conversations[-32:]
            self.count("puts")
        elif op < 0.75:
            self.check(client, self.rng.choice(self.conversations))
        elif op < 0.85 and self.sessions:
            name = self.rng.choice(sorted(self.sessions))
            try:
                _, tokens = client.session_tokens(name)
            except KVTierError as e:
                if e.code != "notFound":
                    raise
                self.sessions.pop(name)  # expired or deleted by a fork-and-delete race of ours
                raise
            if name in self.uncertain:
                old, new = self.uncertain.pop(name)
                if (old is not None and np.array_equal(tokens, old)) or (
                        0 < len(tokens) <= len(new) and np.array_equal(tokens, new[:len(tokens)])):
                    self.sessions[name] = tokens
            if not np.array_equal(tokens, self.sessions[name]):
                want = self.sessions[name]
                same = int(np.argmin(np.concatenate([tokens[:len(want)] == want[:len(tokens)], [False]])))
                self.count("wrong_bytes")
                self.fail(f"session {name} resumed {len(tokens)} tokens that differ from the last put's "
                          f"({len(want)} tokens; the first {same} agree; history {self.history.get(name)})")
            self.count("resumes")
            self.check(client, tokens)
        elif op < 0.92:
            if self.sessions and self.rng.random() < 0.5:
                client.evict(session=self.rng.choice(sorted(self.sessions)), delete=self.rng.random() < 0.2)
            else:
                client.evict(MODEL, self.rng.choice(self.conversations), delete=self.rng.random() < 0.2)
            self.count("evicts")
        elif op < 0.96 and self.sessions:
            source = self.rng.choice(sorted(self.sessions))
            target = f"{self.name}-f{self.rng.randrange(4)}"
            client.fork(source, target)
            self.sessions[target] = self.sessions[source]
            self.history.setdefault(target, []).append(("fork", source, len(self.sessions[source])))
            self.uncertain.pop(target, None)
            if source in self.uncertain:
                self.uncertain[target] = self.uncertain[source]
            self.count("forks")
        elif self.sessions:
            name = self.rng.choice(sorted(self.sessions))
            client.delete_session(name)
            self.sessions.pop(name)
            self.uncertain.pop(name, None)
            self.count("deletes")
        else:
            client.lookup(MODEL, self.rng.choice(self.conversations))
        self.count("ops")

    def run(self, deadline: float) -> None:
        client = None
        while time.monotonic() < deadline:
            try:
                if client is None:
                    client = kvtier.Client(self.socket)
                self.step(client)
            except KVTierError as e:
                if e.code in EXPECTED_CODES:
                    self.count("expected_errors")
                    continue
                self.count("unexpected_errors")
                self.fail(f"{e.code}: {e.message}")
                try:
                    client.close()
                except Exception:
                    pass
                client = None
                time.sleep(0.05)
            except Exception:
                self.count("unexpected_errors")
                self.fail(traceback.format_exc(limit=3))
                client = None
                time.sleep(0.05)
        if client is not None:
            client.close()


def worker_main(index: int, socket: str, counters, seed: int, failures: str, deadline: float) -> None:
    if os.getuid() == 0 and index % 2 == 1:
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    Worker(index, socket, counters, seed, failures).run(deadline)


def sample(pid: int) -> dict:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem", "Threads"):
                fields[key] = int(value.split()[0])
    return {"rss_kib": fields.get("VmRSS", 0), "anon_kib": fields.get("RssAnon", 0),
            "shmem_kib": fields.get("RssShmem", 0), "threads": fields.get("Threads", 0),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def wait_for_socket(path: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kvtierd exited with {proc.returncode}")
        try:
            with kvtier.Client(path) as c:
                c.ping()
            return
        except (OSError, KVTierError):
            time.sleep(0.05)
    raise RuntimeError(f"kvtierd did not answer on {path} within {seconds} s")


def default_daemon() -> str:
    for build in ("release", "debug"):
        candidate = os.path.join(REPO, ".build", build, "kvtierd")
        if os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit("no kvtierd: swift build -c release --product kvtierd, or pass --daemon")


def soak(daemon: str, clients: int, duration: float, seed: int, kill_every: float, ram_budget: str,
         disk_budget: str) -> dict:
    work = tempfile.mkdtemp(prefix="kvtier-soak-")
    os.chmod(work, 0o755)  # the other tenant's workers must reach the socket
    socket = os.path.join(work, "s.sock")
    failures = os.path.join(work, "failures.txt")
    open(failures, "w").close()
    os.chmod(failures, 0o666)
    log = open(os.path.join(work, "kvtierd.log"), "w+")
    proc = subprocess.Popen([daemon, "--socket", socket, "--state-dir", os.path.join(work, "state"),
                             "--ram-budget", ram_budget, "--disk-budget", disk_budget, "--disk-codec", "fp16+zstd",
                             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    result: dict = {"clients": clients, "duration_s": duration, "seed": seed, "ram_budget": ram_budget,
                    "disk_budget": disk_budget}
    try:
        wait_for_socket(socket, proc, 120)
        baseline = sample(proc.pid)
        ctx = mp.get_context("fork")
        counters = ctx.Array("q", clients * len(COUNTERS), lock=False)
        rng = random.Random(seed)
        deadline = time.monotonic() + duration

        def start(i: int):
            p = ctx.Process(target=worker_main, args=(i, socket, counters, rng.randrange(1 << 62), failures, deadline))
            p.start()
            return p

        workers = [start(i) for i in range(clients)]
        samples = []
        kills = 0
        next_kill = time.monotonic() + kill_every
        while time.monotonic() < deadline:
            time.sleep(1)
            if proc.poll() is not None:
                raise RuntimeError(f"kvtierd died (exit {proc.returncode}) during the soak")
            samples.append(sample(proc.pid))
            if kill_every > 0 and time.monotonic() >= next_kill and time.monotonic() < deadline - 2:
                victim = rng.randrange(clients)
                if workers[victim].is_alive():
                    os.kill(workers[victim].pid, signal.SIGKILL)
                    workers[victim].join()
                    kills += 1
                workers[victim] = start(victim)
                next_kill += kill_every
        for p in workers:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()
        # The clients are gone: the daemon's descriptors and threads must come back down.
        settle = time.monotonic() + 30
        after = sample(proc.pid)
        while time.monotonic() < settle and (after["fds"] > baseline["fds"] + 6 or after["threads"] > baseline["threads"] + 2):
            time.sleep(0.5)
            after = sample(proc.pid)
        with kvtier.Client(socket) as c:
            c.ping()
            status = c.status()
        totals = {name: 0 for name in COUNTERS}
        for w in range(clients):
            for i, name in enumerate(COUNTERS):
                totals[name] += counters[w * len(COUNTERS) + i]
        with open(failures) as f:
            failure_lines = f.read().splitlines()
        result.update(
            workers_killed=kills, totals=totals, failures=failure_lines[:20], failure_count=len(failure_lines),
            baseline=baseline, after=after,
            peak={k: max(s[k] for s in samples) for k in baseline} if samples else baseline,
            daemon={k: status[k] for k in sorted(status) if k.startswith(("pages", "ram", "disk", "evictions", "gets", "puts"))},
        )
        # Each tenant keeps two arena memfds open for the daemon's life (docs/security.md).
        tenants = 2 if os.getuid() == 0 and clients > 1 else 1
        result["ok"] = (totals["wrong_bytes"] == 0 and totals["unexpected_errors"] == 0 and totals["gets"] > 0
                        and after["fds"] <= baseline["fds"] + 2 + 2 * tenants and after["threads"] <= baseline["threads"] + 2)
        return result
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        result["daemon_exit"] = proc.returncode
        log.seek(0)
        result["daemon_log_tail"] = log.read()[-2000:]
        log.close()
        if result.get("ok"):
            shutil.rmtree(work, ignore_errors=True)
        else:
            result["work_dir"] = work


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--daemon", default=None)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--kill-every", type=float, default=5)
    ap.add_argument("--ram-budget", default="32MiB")
    ap.add_argument("--disk-budget", default="512MiB")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(f"soak: seed {args.seed}", file=sys.stderr)
    result = soak(args.daemon or default_daemon(), args.clients, args.duration, args.seed, args.kill_every,
                  args.ram_budget, args.disk_budget)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
