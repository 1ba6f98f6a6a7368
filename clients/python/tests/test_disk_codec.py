"""A model's own disk codec (``ModelSpec.disk_codec``, REGISTER_MODEL's trailing ``diskCodec``):
part of the model id, and the codec its pages are written to disk with whatever the daemon's
``diskCodec`` is (see conftest.py for the daemon)."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

import kvtier
from kvtier import _wire
from kvtier.errors import KVTierError

# Codec tags (docs/codecs.md): quantizer in bits 0-7, lossless stage above.
TAG_FP16 = 1
TAG_K4V4 = 3

LLAMA = dict(layers=32, kv_heads=8, head_dim=128, dtype="bfloat16", page_tokens=256, rope_theta=500000.0)


def reference_id(name, layers, kv_heads, head_dim, element_type, page_tokens, rope_theta, codec=""):
    """docs/protocol.md's fingerprint, written out independently of the client."""
    data = (b"kvtier-model-v1\x00" + struct.pack("<H", len(name.encode())) + name.encode()
            + struct.pack("<HHHBBHf", layers, kv_heads, head_dim, element_type, 0, page_tokens, rope_theta))
    if codec:
        data += struct.pack("<H", len(codec.encode())) + codec.encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


# ---------------------------------------------------------------- pure


def test_model_ids_without_a_codec_do_not_change():
    assert kvtier.ModelSpec("llama-3.1-8b", **LLAMA).model_id() == 0xFA5018392055E287
    assert kvtier.ModelSpec("llama-3.1-8b", **LLAMA, disk_codec="").model_id() == 0xFA5018392055E287
    assert kvtier.ModelSpec("llama-3.1-8b", **LLAMA).register_body() == \
        kvtier.ModelSpec("llama-3.1-8b", **LLAMA, disk_codec="").register_body()


def test_model_id_with_a_codec_matches_the_documented_vector():
    spec = kvtier.ModelSpec("llama-3.1-8b", **LLAMA, disk_codec="fp16")
    assert spec.model_id() == 0x891F60FD58F9A27B
    assert spec.model_id() == reference_id("llama-3.1-8b", 32, 8, 128, 2, 256, 500000.0, "fp16")
    assert spec.register_body() == kvtier.ModelSpec("llama-3.1-8b", **LLAMA).register_body() + b"\x04\x00fp16"
    assert kvtier.ModelSpec("llama-3.1-8b", **LLAMA, disk_codec="tq3m+zstd(3)").model_id() == 0x1F276863F5B8C7A7


@pytest.mark.parametrize("spelling, canonical", [
    ("fp16", "fp16"), ("FP16", "fp16"), ("fp16+zstd", "fp16+zstd"), ("fp16+zstd(1)", "fp16+zstd"),
    ("fp16+ZSTD1", "fp16+zstd"), ("fp16+zstd-1", "fp16+zstd"), ("tq3m+zstd(3)", "tq3m+zstd(3)"),
    ("tq3m+zstd3", "tq3m+zstd(3)"), ("q8+lz4", "q8+lz4"), ("k4v4+zstd(+19)", "k4v4+zstd(19)"),
])
def test_spellings_of_one_codec_give_one_id(spelling, canonical):
    assert _wire.canonical_codec(spelling) == canonical
    base = dict(layers=2, kv_heads=2, head_dim=64)
    assert kvtier.ModelSpec("m", **base, disk_codec=spelling).model_id() == kvtier.ModelSpec("m", **base, disk_codec=canonical).model_id()


@pytest.mark.parametrize("name", ["fp32", "fp16+", "+lz4", "fp16+none", "fp16+zstd(20)", "fp16+zstd(0)", "fp16+zstd(-1)",
                                  "fp16+gzip", " fp16", "fp16+zstd(1", "fp16+zstd()"])
def test_names_the_client_does_not_know_are_sent_as_given(name):
    assert _wire.canonical_codec(name) is None
    assert kvtier.ModelSpec("m", 1, 1, 64, disk_codec=name).register_body().endswith(name.encode())


def test_disk_codec_validation():
    with pytest.raises(ValueError):
        kvtier.ModelSpec("m", 1, 1, 64, disk_codec=None)
    with pytest.raises(ValueError):
        kvtier.ModelSpec("m", 1, 1, 64, disk_codec="x" * 256)
    kvtier.ModelSpec("m", 1, 1, 64, disk_codec="x" * 255)  # the daemon judges the name


def test_models_reply_reads_the_codec_marker():
    fixed = struct.pack("<H", 1) + b"m" + struct.pack("<HHHBBHf", 2, 2, 64, 1, 0, 16, 10000.0)
    with_codec = bytearray(fixed)
    with_codec[2 + 1 + 7] = 1
    body = (struct.pack("<II", 2, 2) + struct.pack("<Q", 5) + bytes(with_codec) + b"\x04\x00fp16"
            + struct.pack("<Q", 6) + fixed)
    total, models = _wire.models_reply(body)
    assert total == 2 and [(m.model_id, m.disk_codec) for m in models] == [(5, "fp16"), (6, "")]
    bad = bytearray(body)
    bad[8 + 8 + 2 + 1 + 7] = 2
    with pytest.raises(kvtier.ProtocolViolation):
        _wire.models_reply(bytes(bad))


# ---------------------------------------------------------------- against kvtierd


def random_kv(spec, n, seed):
    rng = np.random.default_rng(seed)
    shape = (spec.layers, n, spec.kv_heads, spec.head_dim)
    return rng.standard_normal(shape).astype(np.float16), rng.standard_normal(shape).astype(np.float16)


@pytest.fixture(scope="module")
def k4v4_daemon(start_daemon):
    return start_daemon("--ram-budget", "256MiB", "--disk-codec", "k4v4")


def test_the_daemon_gives_the_id_the_client_computes(k4v4_daemon):
    base = dict(layers=2, kv_heads=2, head_dim=64, page_tokens=16)
    with kvtier.Client(k4v4_daemon.socket) as c:
        for codec in ["", "fp16", "FP16+zstd(1)", "tq3m+zstd(3)", "k4v4"]:
            spec = kvtier.ModelSpec("codec-ids", **base, disk_codec=codec)
            assert c.register(spec) == spec.model_id(), codec
        plain = kvtier.ModelSpec("codec-ids", **base)
        assert c.register(plain) == reference_id("codec-ids", 2, 2, 64, 1, 16, 10000.0)
        listed = {m.model_id: m.disk_codec for m in c.models()}
        assert listed[plain.model_id()] == ""
        assert listed[kvtier.ModelSpec("codec-ids", **base, disk_codec="fp16+zstd").model_id()] == "fp16+zstd"
        assert listed[kvtier.ModelSpec("codec-ids", **base, disk_codec="tq3m+zstd(3)").model_id()] == "tq3m+zstd(3)"
        with pytest.raises(KVTierError) as refused:
            c.register(kvtier.ModelSpec("codec-ids", **base, disk_codec="fp32"))
        assert refused.value.code == "invalidArgument" and "fp16+lz4" in refused.value.message


def test_an_fp16_model_comes_back_from_disk_bit_identical_and_the_default_does_not(k4v4_daemon):
    n = 40  # pages of 16, 16, 8
    toks = list(range(7000, 7000 + n))
    lossless = kvtier.ModelSpec("codec-round-trip", layers=2, kv_heads=2, head_dim=64, page_tokens=16, disk_codec="fp16")
    default = kvtier.ModelSpec("codec-round-trip", layers=2, kv_heads=2, head_dim=64, page_tokens=16)
    k, v = random_kv(lossless, n, 11)
    with kvtier.Client(k4v4_daemon.socket) as c:
        for spec in (lossless, default):
            assert c.put(spec, toks, k, v) == n
            ev = c.evict(spec)
            assert ev.evicted == 3 and ev.skipped == 0
            _, pages = c.pages(spec)
            assert len(pages) == 3 and all(p.on_disk and not p.in_ram for p in pages)
            assert {p.codec_tag for p in pages} == ({TAG_FP16} if spec is lossless else {TAG_K4V4})
        keys, values = c.get(lossless, toks)
        assert np.array_equal(keys.view(np.uint16), k.view(np.uint16))
        assert np.array_equal(values.view(np.uint16), v.view(np.uint16))
        keys, values = c.get(default, toks)
        assert keys.shape == k.shape
        assert not np.array_equal(keys.view(np.uint16), k.view(np.uint16)), "k4v4 changed nothing: the test would not notice"
        assert np.abs(keys.astype(np.float32) - k.astype(np.float32)).max() < 1.0  # quantized, not garbage


def test_the_codec_survives_a_restart(start_daemon):
    d = start_daemon("--ram-budget", "256MiB")
    spec = kvtier.ModelSpec("codec-restart", layers=2, kv_heads=2, head_dim=64, page_tokens=16, disk_codec="fp16+zstd")
    first, later = list(range(100, 132)), list(range(200, 232))
    k, v = random_kv(spec, 32, 12)
    with kvtier.Client(d.socket) as c:
        c.put(spec, first, k, v, session="codec-session")  # a session: MODELS lists its model after a restart
    d.restart()
    with kvtier.Client(d.socket) as c:
        # Before any REGISTER_MODEL since the restart: the daemon knows the model and its codec
        # from its catalog, and lists it so that registering it elsewhere gives the same id.
        assert [(m.model_id, m.disk_codec) for m in c.models()] == [(spec.model_id(), "fp16+zstd")]
        mid = spec.model_id()
        keys, values = c.get(spec, first)
        assert np.array_equal(keys.view(np.uint16), k.view(np.uint16))
        c.put(spec, later, k, v)
        c.evict(mid)
        _, pages = c.pages(mid)
        assert len(pages) == 4 and {p.codec_tag for p in pages} == {TAG_FP16 | 2 << 8 | 1 << 16}  # fp16+zstd(1)
        keys, values = c.get(spec, later)
        assert np.array_equal(values.view(np.uint16), v.view(np.uint16))
