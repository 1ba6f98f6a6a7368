"""End-to-end tests of the kvtier client against a real kvtierd (see conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import kvtier
from kvtier import _wire

from _child import MODEL, kv, tokens  # noqa: E402  (tests/ is on sys.path under pytest)
from conftest import run_as_uid  # noqa: E402

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_child.py")
SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def run_child(*args, timeout=30):
    out = subprocess.run([sys.executable, CHILD, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def model(name, **kw):
    base = dict(layers=2, kv_heads=2, head_dim=32, page_tokens=16)
    base.update(kw)
    return kvtier.ModelSpec(name, **base)


def random_kv(spec, n, seed):
    rng = np.random.default_rng(seed)
    shape = (spec.layers, n, spec.kv_heads, spec.head_dim)
    if spec.dtype == "bfloat16":
        return rng.integers(0, 1 << 16, shape, dtype=np.uint16), rng.integers(0, 1 << 16, shape, dtype=np.uint16)
    return rng.standard_normal(shape).astype(np.float16), rng.standard_normal(shape).astype(np.float16)


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# ---------------------------------------------------------------- pure


def test_model_id_test_vector():
    spec = kvtier.ModelSpec("llama-3.1-8b", layers=32, kv_heads=8, head_dim=128, dtype="bfloat16",
                            page_tokens=256, rope_theta=500000.0)
    assert spec.model_id() == 0xFA5018392055E287
    assert kvtier.ModelSpec("llama-3.1-8b", 32, 8, 128, "bfloat16", 0, 500000.0).model_id() == 0xFA5018392055E287


def test_default_socket_path():
    assert kvtier.default_socket_path({"XDG_RUNTIME_DIR": "/run/user/5"}, 5) == "/run/user/5/kvtier/kvtierd.sock"
    assert kvtier.default_socket_path({"XDG_STATE_HOME": "/s", "HOME": "/h"}, 5) == "/s/kvtier/kvtierd.sock"
    assert kvtier.default_socket_path({"HOME": "/h"}, 0) == "/run/kvtier/kvtierd.sock"
    assert kvtier.default_socket_path({"XDG_STATE_HOME": "/s", "HOME": "/h"}, 0) == "/s/kvtier/kvtierd.sock"
    assert kvtier.default_socket_path({"HOME": "/h"}, 5) == "/h/.local/state/kvtier/kvtierd.sock"


def test_model_spec_validation():
    with pytest.raises(ValueError):
        kvtier.ModelSpec("m", 0, 1, 1)
    with pytest.raises(ValueError):
        kvtier.ModelSpec("m", 1, 1, 1, dtype="float32")


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("shared", [True, False], ids=["shm", "inline"])
def test_round_trip(daemon, shared):
    spec = model(f"rt-{shared}")
    n = 70  # 4 whole pages and a partial one of 6
    k, v = random_kv(spec, n, 1)
    toks = list(range(5000, 5000 + n))
    with kvtier.Client(daemon.socket, shared_memory=shared) as c:
        assert c.shared_memory is shared
        assert c.register(spec) == spec.model_id()
        assert c.lookup(spec, toks) == 0
        r = c.put_detail(spec, toks, k, v)
        assert (r.cached_tokens, r.new_pages, r.sent_tokens) == (n, 5, n)
        d = c.lookup_detail(spec, toks + [1, 2, 3])
        assert (d.cached_tokens, d.ram_tokens, d.disk_tokens) == (n, n, 0)
        assert c.lookup(spec, toks[:40]) == 32  # whole pages; no partial page of 8 is stored
        keys, values = c.get(spec, toks + [9])
        assert keys.shape == (2, n, 2, 32) and keys.dtype == np.float16
        assert np.array_equal(keys, k) and np.array_equal(values, v)
        keys, values = c.get(spec, toks, max_tokens=21)  # ends inside a page
        assert np.array_equal(keys, k[:, :21]) and np.array_equal(values, v[:, :21])
        keys, values = c.get(spec, [1, 2, 3])
        assert keys.shape == (2, 0, 2, 32)
        buf = (np.zeros((2, 80, 2, 32), np.float16), np.zeros((2, 80, 2, 32), np.float16))
        keys, values = c.get(spec, toks, out=buf)  # into caller buffers, no allocation
        assert keys.shape[1] == n and np.shares_memory(keys, buf[0]) and np.shares_memory(values, buf[1])
        assert np.array_equal(buf[0][:, :n], k) and np.array_equal(buf[1][:, :n], v)
        with pytest.raises(ValueError):
            c.get(spec, toks, out=(buf[0][:, :10], buf[1][:, :10]))
        assert wait_for(lambda: c.status()["leases"] == 0)


def test_shared_and_inline_see_the_same_pages(daemon):
    spec = model("cross")
    k, v = random_kv(spec, 50, 2)
    toks = list(range(50))
    with kvtier.Client(daemon.socket) as shm, kvtier.Client(daemon.socket, shared_memory=False) as inl:
        assert shm.put(spec, toks, k, v) == 50
        keys, values = inl.get(spec, toks)
        assert np.array_equal(keys, k) and np.array_equal(values, v)
        k2, v2 = random_kv(spec, 80, 3)
        k2[:, :50], v2[:, :50] = k, v
        assert inl.put(spec, list(range(80)), k2, v2) == 80
        keys, values = shm.get(spec, list(range(80)))
        assert np.array_equal(keys, k2) and np.array_equal(values, v2)


def test_bfloat16_bit_patterns(daemon):
    spec = model("bf16", dtype="bfloat16", page_tokens=8)
    k, v = random_kv(spec, 20, 4)
    with kvtier.Client(daemon.socket) as c:
        with pytest.raises(TypeError):
            c.put(spec, range(20), k.view(np.float16), v.view(np.float16))
        assert c.put(spec, range(20), k, v) == 20
        keys, values = c.get(spec, range(20))
        assert keys.dtype == np.uint16 and np.array_equal(keys, k) and np.array_equal(values, v)


def test_non_contiguous_input(daemon):
    spec = model("strided")
    k, v = random_kv(spec, 33, 5)
    big_k = np.zeros((2, 33, 4, 32), np.float16)
    big_k[:, :, ::2] = k  # a strided view as input
    with kvtier.Client(daemon.socket) as c:
        c.put(spec, range(33), big_k[:, :, ::2], v)
        keys, _ = c.get(spec, range(33))
        assert np.array_equal(keys, k)


def test_extending_put_sends_only_new_tokens(daemon):
    spec = model("turns")
    k, v = random_kv(spec, 90, 6)
    toks = list(range(7, 97))
    for shared in (True, False):
        spec = model(f"turns-{shared}")
        with kvtier.Client(daemon.socket, shared_memory=shared) as c:
            first = c.put_detail(spec, toks[:40], k[:, :40], v[:, :40])  # pages 0, 1 and 8 of page 2
            assert (first.cached_tokens, first.new_pages, first.sent_tokens) == (40, 3, 40)
            second = c.put_detail(spec, toks, k, v)  # turn 2: completes page 2, adds 3 more
            assert (second.cached_tokens, second.sent_tokens) == (90, 50)
            assert second.new_pages == 4
            again = c.put_detail(spec, toks, k, v)
            assert (again.cached_tokens, again.new_pages, again.sent_tokens, again.requests) == (90, 0, 0, 0)
            keys, values = c.get(spec, toks)
            assert np.array_equal(keys, k) and np.array_equal(values, v)
            assert c.lookup(spec, toks[:40]) == 32  # the 8-token partial page was superseded


def test_inline_put_is_split_under_the_frame_limit(daemon):
    spec = model("split")
    n = 200
    k, v = random_kv(spec, n, 7)
    with kvtier.Client(daemon.socket, shared_memory=False) as c:
        c.max_inline_body = 40 * spec.bytes_per_token  # pretend the limit is small: ~40 tokens a frame
        r = c.put_detail(spec, range(n), k, v)
        assert r.cached_tokens == n and r.requests >= 5 and r.new_pages == 13
        keys, values = c.get(spec, range(n))  # inline GETs are capped to whole pages that fit
        served = keys.shape[1]
        assert 0 < served < n and served % 16 == 0
        assert np.array_equal(keys, k[:, :served]) and np.array_equal(values, v[:, :served])
    with kvtier.Client(daemon.socket) as c:
        keys, values = c.get(spec, range(n))
        assert np.array_equal(keys, k) and np.array_equal(values, v)


# ---------------------------------------------------------------- processes and tenants


def test_two_processes_share_a_prefix(daemon):
    first = run_child("put", daemon.socket, 64, 11)
    assert first == {"cached": 64, "new_pages": 4, "sent": 64}
    k, v = kv(64, 11)
    with kvtier.Client(daemon.socket) as c:
        assert c.lookup(MODEL, tokens(64)) == 64
        keys, values = c.get(MODEL, tokens(64))
        assert np.array_equal(keys, k) and np.array_equal(values, v)
    second = run_child("put", daemon.socket, 64, 11)
    assert second == {"cached": 64, "new_pages": 0, "sent": 0}
    third = run_child("put", daemon.socket, 80, 11)  # shares 64 tokens, adds one page
    assert third == {"cached": 80, "new_pages": 1, "sent": 16}


def test_killed_client_leaks_no_lease(daemon):
    with kvtier.Client(daemon.socket) as c:
        before = c.status()["leases"]
        child = subprocess.Popen([sys.executable, CHILD, "alloc-and-wait", daemon.socket], stdout=subprocess.PIPE, text=True)
        try:
            line = child.stdout.readline()
            assert json.loads(line)["allocated"] == 4, line
            assert c.status()["leases"] == before + 1
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
        assert wait_for(lambda: c.status()["leases"] == before), c.status()
        # The arena is still usable by others.
        spec = model("after-kill")
        k, v = random_kv(spec, 64, 12)
        assert c.put(spec, range(64), k, v) == 64


def _other_uid_lookup(sock, n):
    """The lookup of tokens(n) by uid 65534: with setpriv if it can run this interpreter, else
    from a forked child that drops to that uid (the interpreter may live under /root)."""
    setpriv = shutil.which("setpriv")
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC), HOME="/tmp")
    cmd = [setpriv, "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable]
    probe = subprocess.run(cmd + ["-c", "import numpy, kvtier"], env=env, capture_output=True)
    if probe.returncode == 0:
        out = subprocess.run(cmd + [CHILD, "lookup", sock, str(n)], env=env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    def work():
        with kvtier.Client(sock) as c:
            return {"cached": c.lookup(MODEL, tokens(n)), "tenant": c.tenant, "uid": os.getuid()}

    return run_as_uid(65534, work)


def test_other_uid_sees_nothing(daemon):
    if shutil.which("setpriv") is None or os.getuid() != 0:
        pytest.skip("needs root and setpriv to run a client as another uid")
    assert oct(os.stat(daemon.socket).st_mode & 0o777) == oct(0o666)
    run_child("put", daemon.socket, 48, 21)
    with kvtier.Client(daemon.socket) as c:
        assert c.lookup(MODEL, tokens(48)) == 48
        mine = c.tenant
    other = _other_uid_lookup(daemon.socket, 48)
    assert "error" not in other and "failure" not in other, other
    assert other["uid"] == 65534 and other["tenant"] != mine
    assert other["cached"] == 0


# ---------------------------------------------------------------- disk tier


def test_pages_over_the_ram_budget_go_to_disk_and_come_back_exact(start_daemon):
    d = start_daemon("--ram-budget", "256KiB", "--disk-codec", "fp16")
    spec = model("disk", layers=4, kv_heads=4, head_dim=64, page_tokens=16)  # 64 KiB a page
    n = 16 * 12 + 5
    k, v = random_kv(spec, n, 31)
    with kvtier.Client(d.socket) as c:
        assert c.put(spec, range(n), k, v) == n
        assert wait_for(lambda: c.lookup_detail(spec, range(n)).disk_tokens >= n - 64, 10), c.lookup_detail(spec, range(n))
        detail = c.lookup_detail(spec, range(n))
        assert detail.cached_tokens == n and detail.disk_tokens > 0
        status = c.status()
        assert status["ram_bytes"] <= status["ram_budget_bytes"] and status["disk_pages"] > 0
        # A GET leases at most the tenant's RAM quota (here the budget, 4 pages): it serves the
        # prefix that fits, promoted from disk.
        keys, values = c.get(spec, range(n))
        assert keys.shape[1] == 64
        assert np.array_equal(keys, k[:, :64]) and np.array_equal(values, v[:, :64])
    with kvtier.Client(d.socket, shared_memory=False) as c:
        keys, values = c.get(spec, range(n))
        assert np.array_equal(keys, k[:, :keys.shape[1]]) and np.array_equal(values, v[:, :keys.shape[1]]) and keys.shape[1] == 64


# ---------------------------------------------------------------- errors and robustness


def test_daemon_errors(daemon):
    with kvtier.Client(daemon.socket) as c:
        with pytest.raises(kvtier.KVTierError) as e:
            c.lookup(0x1234, [1, 2, 3])
        assert e.value.code == "notFound" and e.value.status == 5
        assert "0x1234 is not registered" in e.value.message
        spec = model("errors")
        k, v = random_kv(spec, 4, 1)
        with pytest.raises(kvtier.KVTierError) as e:
            c.put(spec, range(4), k, v, session="bad\tname")
        assert e.value.code == "invalidArgument" and "session name" in e.value.message
        with pytest.raises(kvtier.KVTierError) as e:
            c.session_info("never-created")
        assert e.value.code == "notFound" and "never-created" in e.value.message
        with pytest.raises(kvtier.KVTierError) as e:
            c.release(987654)
        assert e.value.code == "notFound"
        with pytest.raises(ValueError):
            c.put(spec, range(5), k, v)  # 4 tokens of KV for 5 tokens
        with pytest.raises(ValueError):
            c.put(spec, [-1, 2, 3, 4], k, v)
        c.ping()  # the connection survived every error
        c.report_attention(spec, range(4), [0.5])
        assert c.status()["models"] >= 1


def test_daemon_gone_raises_connection_error(start_daemon):
    d = start_daemon("--ram-budget", "16MiB")
    c = kvtier.Client(d.socket)
    c.ping()
    d.proc.send_signal(signal.SIGTERM)
    d.proc.wait(10)
    with pytest.raises(kvtier.KVTierConnectionError):
        c.ping()
    with pytest.raises(kvtier.KVTierConnectionError):
        c.status()
    c.close()
    with pytest.raises(kvtier.KVTierConnectionError):
        kvtier.Client(d.socket)


class FakeDaemon:
    """A Unix socket that answers HELLO with whatever bytes a test gives it."""

    def __init__(self, tmp_path, reply: bytes):
        self.path = str(tmp_path / "fake.sock")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(1)
        self.reply = reply
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        conn, _ = self.server.accept()
        with conn:
            head = conn.recv(16, socket.MSG_WAITALL)
            conn.recv(struct.unpack_from("<I", head)[0], socket.MSG_WAITALL)  # the whole HELLO
            conn.sendall(self.reply)
            time.sleep(0.5)

    def close(self):
        self.server.close()
        self.thread.join(2)


def hello_reply(rid=1, length=None, op=1, flags=1):
    body = struct.pack("<HIIIIIQ", 1, 0, 0, 2 << 20, 64 << 20, 262144, 0)
    return struct.pack("<IHHII", len(body) if length is None else length, op, flags, rid, 0) + body


@pytest.mark.parametrize("reply,what", [
    (hello_reply(rid=7), "request 7"),
    (hello_reply(op=2), "opcode"),
    (hello_reply(flags=0), "reply flag"),
    (hello_reply(length=3 << 30), "limit"),
    (hello_reply(length=40), "closed the connection"),
    (hello_reply()[:-1] + b"", "closed the connection"),
])
def test_bad_replies_are_refused(tmp_path, reply, what):
    fake = FakeDaemon(tmp_path, reply)
    try:
        with pytest.raises(kvtier.KVTierError) as e:
            kvtier.Client(fake.path, timeout=5)
        assert what in str(e.value)
    finally:
        fake.close()


def test_hello_wire_bytes():
    body = _wire.hello_request(True, "x")
    assert body == struct.pack("<HHI", 2, 2, 1) + b"\x01\x00x"


def test_a_large_put_fills_its_pages_from_several_threads_exactly(daemon, monkeypatch):
    """Batches of at least PARALLEL_FILL_BYTES are filled by several threads at once: every
    page must still hold its own tokens' bytes (a page filled from another range, or twice,
    would come back wrong)."""
    from kvtier import client as client_module
    calls = []
    pool = client_module._fill_pool()
    original = pool.submit
    monkeypatch.setattr(pool, "submit", lambda f, *args: calls.append(1) or original(f, *args))
    m = model("parallel-fill", layers=2, kv_heads=4, head_dim=64, page_tokens=16)  # 16 KiB pages
    n = 16 * 700  # 700 pages, 10.9 MiB: over PARALLEL_FILL_BYTES
    rng = np.random.default_rng(41)
    k = rng.integers(0, 0x7BFF, size=(2, n, 4, 64), dtype=np.uint16).view(np.float16)
    v = rng.integers(0, 0x7BFF, size=(2, n, 4, 64), dtype=np.uint16).view(np.float16)
    with kvtier.Client(daemon.socket) as c:
        assert c.shared_memory, c.shared_memory_unavailable_reason
        toks = np.arange(1, n + 1, dtype=np.uint32)
        assert c.put(m, toks, k, v) == n
        assert calls, "the batch was not filled by the thread pool"
        keys, values = c.get(m, toks)
        assert np.array_equal(keys.view(np.uint16), k.view(np.uint16))
        assert np.array_equal(values.view(np.uint16), v.view(np.uint16))
