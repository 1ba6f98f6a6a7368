"""The daemon's ``auto`` codec policy (docs/codecs.md, "Codec policy") with a real kvtierd and the
fixture model's captured K/V: the codec it chooses is the one ``kvtier codec advise`` chooses on the
same tensors, pages go to disk with it, and ``codec_choices()`` / ``kvtier status`` report it."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import kvtier

REPO = Path(__file__).resolve().parents[3]
KV = REPO.parent / "shared" / "fixtures" / "kv" / "tinyllama-license"
CANDIDATES = ["tq3", "tq3m", "tq4", "k4v4", "q8", "fp16"]
TAGS = {"tq3": 5, "tq3m": 6, "tq4": 4, "k4v4": 3, "q8": 2, "fp16": 1}


def fixture_kv():
    if not (KV / "k_0.npy").is_file():
        pytest.skip(f"the fixture K/V is not at {KV}")
    layers = sorted(int(p.stem[2:]) for p in KV.glob("k_*.npy"))
    k = np.stack([np.load(KV / f"k_{i}.npy") for i in layers])
    v = np.stack([np.load(KV / f"v_{i}.npy") for i in layers])
    return k, v  # [layers, tokens, kv_heads, head_dim] float16


@pytest.fixture(scope="module")
def auto_daemon(start_daemon, tmp_path_factory):
    config = tmp_path_factory.mktemp("codec-policy") / "kvtierd.json"
    config.write_text(json.dumps({"ramBudget": "256MiB", "codecPolicy": {"mode": "auto", "candidates": CANDIDATES}}))
    return start_daemon("--config", str(config))


def wait_for_choice(client, model_id, timeout=120.0):
    """The model's choice once the policy has measured it (polls the daemon; the measurement
    runs in the background and takes about a second)."""
    deadline = time.monotonic() + timeout
    while True:
        choice = next(c for c in client.codec_choices() if c.model_id == model_id)
        if choice.policy != "measuring" or time.monotonic() > deadline:
            return choice
        time.sleep(0.05)


def test_auto_chooses_what_the_advisor_chooses_and_writes_pages_with_it(auto_daemon, tmp_path):
    k, v = fixture_kv()
    layers, tokens, heads, dim = k.shape
    spec = kvtier.ModelSpec("codec-policy-fixture", layers=layers, kv_heads=heads, head_dim=dim, page_tokens=256)
    toks = list(range(tokens))
    with kvtier.Client(auto_daemon.socket) as c:
        c.register(spec)
        [before] = [x for x in c.codec_choices() if x.model_id == spec.model_id()]
        assert before.policy == "measuring" and before.codec_tag == TAGS["k4v4"], before  # diskCodec until measured
        assert c.put(spec, toks, k, v) == tokens
        choice = wait_for_choice(c, spec.model_id())
        assert choice.policy == "chosen", choice
        assert choice.queries_from == "keys" and choice.max_attention_error == pytest.approx(0.15)
        assert choice.sampled_tokens == 4 * 256 and choice.sampled_layers == layers

        binary = os.environ.get("KVTIER_BIN") or str(REPO / ".build" / "debug" / "kvtier")
        if not Path(binary).is_file():
            pytest.skip("the kvtier CLI is not built (set KVTIER_BIN)")
        args = [binary, "codec", "advise", "--max-attention-error", "0.15", "--codecs", ",".join(CANDIDATES), "--json"]
        for i in range(layers):
            np.save(tmp_path / f"k{i}.npy", k[i])
            np.save(tmp_path / f"v{i}.npy", v[i])
            args += ["--keys", str(tmp_path / f"k{i}.npy"), "--values", str(tmp_path / f"v{i}.npy")]
        advised = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
        assert TAGS[advised["codec"]] == choice.codec_tag, (advised["message"], choice.message)
        assert choice.attention_error == pytest.approx(advised["attentionError"], rel=1e-5)

        assert c.evict(spec).evicted == 4
        _, pages = c.pages(spec)
        assert {p.codec_tag for p in pages} == {choice.codec_tag}
        restored, _ = c.get(spec, toks)
        assert restored.shape == k.shape
        error = np.linalg.norm(restored.astype(np.float32) - k.astype(np.float32)) / np.linalg.norm(k.astype(np.float32))
        assert error < 0.15, "the keys came back as the chosen codec keeps them, not garbage"

        status = json.loads(subprocess.run([binary, "status", "--socket", auto_daemon.socket, "--json"],
                                           capture_output=True, text=True, check=True).stdout)
        [shown] = [x for x in status["codecs"] if int(x["modelID"], 16) == spec.model_id()]
        assert shown["policy"] == "chosen" and TAGS[shown["codec"]] == choice.codec_tag
        assert status["counters"]["codec_policy_auto"] == 1 and status["counters"]["codec_choices"] >= 1


def test_a_fixed_daemon_reports_every_model_as_fixed(daemon):
    spec = kvtier.ModelSpec("codec-policy-fixed", layers=2, kv_heads=2, head_dim=64, page_tokens=16)
    own = kvtier.ModelSpec("codec-policy-own", layers=2, kv_heads=2, head_dim=64, page_tokens=16, disk_codec="q8")
    with kvtier.Client(daemon.socket) as c:
        c.register(spec)
        c.register(own)
        by_id = {x.model_id: x for x in c.codec_choices()}
        assert by_id[spec.model_id()].policy == "fixed" and by_id[spec.model_id()].codec_tag == TAGS["k4v4"]
        assert by_id[own.model_id()].policy == "fixed" and by_id[own.model_id()].codec_tag == TAGS["q8"]
        assert by_id[spec.model_id()].attention_error is None and by_id[spec.model_id()].max_attention_error is None
        assert c.status()["codec_policy_auto"] == 0


def test_reported_queries_replace_the_keys_in_the_measurement(auto_daemon):
    k, v = fixture_kv()
    layers, tokens, heads, dim = k.shape
    q = np.stack([np.load(KV / f"q_{i}.npy") for i in range(layers)])  # [layers, tokens, q_heads, dim]
    proxy = kvtier.ModelSpec("codec-policy-proxy", layers=layers, kv_heads=heads, head_dim=dim, page_tokens=256)
    asked = kvtier.ModelSpec("codec-policy-queries", layers=layers, kv_heads=heads, head_dim=dim, page_tokens=256)
    toks = list(range(tokens))
    with kvtier.Client(auto_daemon.socket) as c:
        c.register(proxy)
        c.register(asked)
        # The last 8 positions' queries, as a decoding step would report them.
        c.report_queries(asked, np.ascontiguousarray(q[:, -8:]))
        for spec in (proxy, asked):
            c.put(spec, toks, k, v)
        by_keys, by_queries = wait_for_choice(c, proxy.model_id()), wait_for_choice(c, asked.model_id())
        assert by_keys.queries_from == "keys" and by_queries.queries_from == "queries", (by_keys, by_queries)
        assert by_queries.policy == "chosen" and by_queries.attention_error is not None
        assert by_queries.attention_error != pytest.approx(by_keys.attention_error, rel=1e-3), "the queries changed nothing"
        assert c.status()["codec_query_samples"] >= 1

        with pytest.raises(ValueError):
            c.report_queries(asked, q[:-1, -8:])  # a layer short
        with pytest.raises(ValueError):
            c.report_queries(asked, np.zeros((layers, 17, q.shape[2], dim), np.float16))  # over 16 per layer
        bad = np.ascontiguousarray(q[:, -1:]).copy()
        bad[0, 0, 0, 0] = np.nan
        with pytest.raises(kvtier.KVTierError) as refused:
            c.report_queries(asked, bad)
        assert refused.value.code == "invalidArgument" and "NaN" in str(refused.value)
        c.ping()  # the connection survives a refused report
