"""Named sessions through a real kvtierd from Python: another process resumes a conversation
after a daemon restart, forks and pins it, and another uid sees none of it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import kvtier
from conftest import Daemon, run_as_uid

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
MODEL = kvtier.ModelSpec("pytest-sessions", layers=2, kv_heads=2, head_dim=32, page_tokens=16)

# Turn 2 in its own process: resume the session, check the bytes, extend it.
RESUME = r"""
import json, sys
import numpy as np
import kvtier
sock, n1, n2 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = kvtier.ModelSpec("pytest-sessions", layers=2, kv_heads=2, head_dim=32, page_tokens=16)
rng = np.random.default_rng(7)
shape = (2, n2, 2, 32)
k, v = rng.standard_normal(shape).astype(np.float16), rng.standard_normal(shape).astype(np.float16)
with kvtier.Client(sock) as c:
    c.register(model)
    mid, toks = c.session_tokens("chat")
    keys, values = c.get(model, toks)
    exact = bool(np.array_equal(keys, k[:, :n1]) and np.array_equal(values, v[:, :n1]))
    cached = c.put(model, list(range(5000, 5000 + n2)), k, v, session="chat")
    print(json.dumps({"tokens": [int(t) for t in toks], "exact": exact, "cached": cached}))
"""


def kv(n):
    rng = np.random.default_rng(7)
    shape = (MODEL.layers, n, MODEL.kv_heads, MODEL.head_dim)
    return rng.standard_normal(shape).astype(np.float16), rng.standard_normal(shape).astype(np.float16)


def restart(d: Daemon, binary: str, *args: str, kill: bool = False) -> Daemon:
    """Stops `d` (SIGTERM, or SIGKILL with `kill`) and starts a new daemon on its folder."""
    if kill:
        d.proc.send_signal(signal.SIGKILL)
    else:
        d.proc.send_signal(signal.SIGTERM)
    d.proc.wait(10)
    d.log.close()
    if os.path.exists(d.socket):  # left behind by SIGKILL: the wait below must see the new one
        os.unlink(d.socket)
    return Daemon(binary, *args, directory=d.dir)


def test_a_session_resumes_in_another_process_after_restart_and_sigkill(binary):
    args = ("--ram-budget", "64MiB", "--disk-codec", "fp16+lz4")
    d = Daemon(binary, *args)
    try:
        n1, n2 = 40, 70
        k, v = kv(n2)
        toks = list(range(5000, 5000 + n2))
        with kvtier.Client(d.socket) as c:
            assert c.put(MODEL, toks[:n1], k[:, :n1], v[:, :n1], session="chat") == n1
            info = c.session_info("chat")
            assert (info.tokens, info.ram_tokens, info.pinned) == (n1, n1, False)
        d = restart(d, binary, *args)
        env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC))
        out = subprocess.run([sys.executable, "-c", RESUME, d.socket, str(n1), str(n2)],
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        turn2 = json.loads(out.stdout.strip().splitlines()[-1])
        assert turn2 == {"tokens": toks[:n1], "exact": True, "cached": n2}
        d = restart(d, binary, *args, kill=True)
        with kvtier.Client(d.socket) as c:
            c.register(MODEL)
            mid, resumed = c.session_tokens("chat")
            assert list(resumed) == toks, "the acknowledged extension survives SIGKILL"
            keys, values = c.get(MODEL, resumed)
            assert np.array_equal(keys, k) and np.array_equal(values, v)
            fork = c.fork("chat", "branch")
            assert (fork.name, fork.tokens, fork.pinned) == ("branch", n2, False)
            c.pin("branch")
            c.set_ttl("chat", 600)
            by_name = {s.name: s for s in c.list_sessions()}
            assert by_name["branch"].pinned and by_name["chat"].ttl_seconds == 600
            c.delete_session("chat")
            assert [s.name for s in c.list_sessions()] == ["branch"]
            with pytest.raises(kvtier.KVTierError) as missing:
                c.session_info("chat")
            assert missing.value.code == "notFound"
            assert c.status()["sessions"] == 1
    finally:
        d.stop()


def _as_uid_65534(sock: str) -> dict:
    """What a client running as uid 65534 sees of sessions."""
    def work():
        with kvtier.Client(sock) as c:
            names = [s.name for s in c.list_sessions()]
            errors = []
            for attempt in (lambda: c.session_tokens("private"), lambda: c.fork("private", "mine"),
                            lambda: c.delete_session("private"), lambda: c.pin("private")):
                try:
                    attempt()
                    errors.append(None)
                except kvtier.KVTierError as e:
                    errors.append(e.code)
            return {"names": names, "errors": errors, "tenant": c.tenant, "uid": os.getuid(),
                    "models": [m.name for m in c.models()]}

    return run_as_uid(65534, work)


def test_another_uid_sees_no_sessions(binary):
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    d = Daemon(binary)
    try:
        k, v = kv(20)
        with kvtier.Client(d.socket) as c:
            c.put(MODEL, list(range(20)), k[:, :20], v[:, :20], session="private")
            mine = c.tenant
        other = _as_uid_65534(d.socket)
        assert "failure" not in other, other
        assert other["uid"] == 65534 and other["tenant"] != mine
        assert other["names"] == [] and other["errors"] == ["notFound"] * 4
        assert other["models"] == [], "another tenant's model names are not listed to it"
        with kvtier.Client(d.socket) as c:
            assert [s.name for s in c.list_sessions()] == ["private"], "nothing of it was touched"
    finally:
        d.stop()


def test_pages_evict_and_models(binary):
    d = Daemon(binary, "--disk-codec", "fp16")
    try:
        k, v = kv(40)
        toks = list(range(7000, 7040))
        with kvtier.Client(d.socket) as c:
            c.put(MODEL, toks, k[:, :40], v[:, :40], session="inspect")
            registered = [m for m in c.models() if m.name == MODEL.name]
            assert len(registered) == 1
            m = registered[0]
            assert (m.model_id, m.layers, m.kv_heads, m.head_dim, m.dtype, m.page_tokens) == \
                (c.register(MODEL), 2, 2, 32, "float16", 16)
            total, pages = c.pages(MODEL)
            assert total == 3 and sorted(p.tokens for p in pages) == [8, 16, 16]
            assert all(p.in_ram and p.on_disk and p.hold == "session" and p.codec_tag == 1 for p in pages)
            assert [p.key for p in c.pages(limit=2)[1]] == [p.key for p in pages[:2]]
            result = c.evict(session="inspect")
            assert (result.evicted, result.deleted, result.skipped) == (3, 0, 0)
            detail = c.lookup_detail(MODEL, toks)
            assert (detail.ram_tokens, detail.disk_tokens) == (0, 40)
            keys, values = c.get(MODEL, toks)
            assert np.array_equal(keys, k[:, :40]) and np.array_equal(values, v[:, :40])
            assert c.evict(delete=True).deleted == 3
            assert c.lookup(MODEL, toks) == 0
            with pytest.raises(ValueError):
                c.evict(session="inspect", model=MODEL)
    finally:
        d.stop()


def test_a_shared_tenant_group_shares_pages_and_sessions(binary, tmp_path):
    """With ``sharedTenantGroups: ["0"]``, a client of uid 65534 whose primary group is 0 shares
    root's (group 0's) tenant; the same uid in its own group sees nothing."""
    if os.getuid() != 0 or os.getgid() != 0:
        pytest.skip("needs root (uid and primary group 0) to run clients as another uid")
    config = tmp_path / "kvtierd.json"
    config.write_text('{"sharedTenantGroups": ["0"]}')
    d = Daemon(binary, "--config", str(config))
    try:
        k, v = kv(20)
        with kvtier.Client(d.socket) as c:
            c.put(MODEL, list(range(20)), k[:, :20], v[:, :20], session="team")
            mine = c.tenant
        assert mine == (1 << 31) | 0, "root's primary group 0 is listed: the group's tenant"

        def work():
            with kvtier.Client(d.socket) as c:
                return {"tenant": c.tenant, "cached": c.lookup(MODEL, list(range(20))),
                        "sessions": [s.name for s in c.list_sessions()]}

        same_group = run_as_uid(65534, work, gid=0)
        assert same_group == {"tenant": mine, "cached": 20, "sessions": ["team"]}, same_group
        own_group = run_as_uid(65534, work)
        assert own_group == {"tenant": 65534, "cached": 0, "sessions": []}, own_group
    finally:
        d.stop()


@pytest.mark.parametrize("shared_memory", [True, False])
def test_a_session_put_of_tokens_already_cached_still_names_them(daemon, shared_memory):
    # The client used to skip the PUT when every token was cached, so the session never moved to
    # them (the 64-client soak caught it: a resume returned the session's previous sequence).
    tokens = np.arange(900, 900 + 70, dtype=np.uint32) + (0 if shared_memory else 5000)
    keys, values = kv(70)
    with kvtier.Client(daemon.socket, shared_memory=shared_memory) as c:
        c.put(MODEL, tokens, keys, values)
        name = f"already-cached-{shared_memory}"
        assert c.put(MODEL, tokens, keys, values, session=name) == 70
        _, resumed = c.session_tokens(name)
        assert np.array_equal(resumed, tokens)
        shorter = tokens[:40]
        c.put(MODEL, shorter, keys[:, :40], values[:, :40], session=name)
        assert np.array_equal(c.session_tokens(name)[1], shorter)
