"""The `kvtier` CLI against the NumPy reference codecs and the fixture model.

These tests drive the release-built binary (KVTIER_BIN, default .build/release/kvtier) the way
the quality harness does, so a layout disagreement between the Swift/C kernels and the
independent NumPy reference shows up here. They skip with a reason when the binary or
../shared/fixtures is missing.
"""
import json
import os
import subprocess

import numpy as np
import pytest

import codecs_ref as C
import eval_codecs as E

REPO = E.REPO
KVTIER = os.environ.get("KVTIER_BIN", os.path.join(REPO, ".build", "release", "kvtier"))
FIXTURES = E.DEFAULT_FIXTURES

needs_cli = pytest.mark.skipif(not os.access(KVTIER, os.X_OK), reason=f"no kvtier binary at {KVTIER} (swift build -c release)")
needs_fixtures = pytest.mark.skipif(
    not os.path.isdir(os.path.join(FIXTURES, "kv")), reason=f"fixtures not found at {FIXTURES}")

LOSSY = ["q8", "k4v4", "tq4", "tq3", "tq3m", "tq3s", "tq2s"]
MIXED = ["tq3s", "tq2s"]


def run_cli(*args):
    return subprocess.run([KVTIER, *args], capture_output=True, text=True, timeout=120)


def roundtrip(tmp_path, codec, k, v, page_tokens=256):
    paths = {n: str(tmp_path / f"{n}.npy") for n in ("k", "v", "k2", "v2")}
    np.save(paths["k"], k.astype(np.float16))
    np.save(paths["v"], v.astype(np.float16))
    r = run_cli("codec", "roundtrip", "--codec", codec, "--keys", paths["k"], "--values", paths["v"],
                "--out-keys", paths["k2"], "--out-values", paths["v2"], "--page-tokens", str(page_tokens), "--json")
    assert r.returncode == 0, r.stderr
    return np.load(paths["k2"]), np.load(paths["v2"]), json.loads(r.stdout)


@pytest.fixture(scope="module")
def layers():
    return E.load_kv(FIXTURES)


@needs_cli
def test_codec_list_names_every_codec_with_its_bits():
    r = run_cli("codec", "list", "--json")
    assert r.returncode == 0, r.stderr
    entries = {e["name"]: e for e in json.loads(r.stdout)}
    for name in ["fp16", "q8", "k4v4", "tq4", "tq3", "tq3m", "tq3s", "tq2s", "k4v4+zstd", "fp16+zstd", "fp16+lz4"]:
        assert name in entries, name
    for name in ["fp16", "q8", "k4v4", "tq4", "tq3", "tq3m", "tq3s", "tq2s"]:
        assert entries[name]["bitsPerElement"] == pytest.approx(C.bits_per_element(name, T=256, H=8, D=128))


@needs_cli
@needs_fixtures
@pytest.mark.parametrize("codec", ["fp16", "q8", "k4v4"])
def test_exact_codecs_match_the_numpy_reference_bit_for_bit(tmp_path, layers, codec):
    for q, k, v in layers[:3]:
        k2, v2, info = roundtrip(tmp_path, codec, k, v)
        rk, rv = C.roundtrip(codec, k.astype(np.float32), v.astype(np.float32))
        np.testing.assert_array_equal(k2, rk.astype(np.float16))
        np.testing.assert_array_equal(v2, rv.astype(np.float16))
        assert info["bitsPerElement"] == pytest.approx(C.bits_per_element(codec, T=k.shape[0], H=k.shape[1], D=k.shape[2]))


@needs_cli
@needs_fixtures
@pytest.mark.parametrize("codec", ["tq4", "tq3", "tq3m", "tq3s", "tq2s"])
def test_rotation_codecs_match_the_numpy_reference(tmp_path, layers, codec):
    # Sums may be evaluated in another order, so a rare code next to a boundary may differ.
    for q, k, v in layers[:3]:
        k2, v2, info = roundtrip(tmp_path, codec, k, v)
        rk, rv = C.roundtrip(codec, k.astype(np.float32), v.astype(np.float32))
        for got, ref in ((k2, rk), (v2, rv)):
            diff = np.linalg.norm(got.astype(np.float32) - ref) / np.linalg.norm(ref)
            assert diff < 5e-3, f"{codec}: CLI and NumPy reference differ by {diff:.2e}"
        assert info["bitsPerElement"] == pytest.approx(C.bits_per_element(codec, T=k.shape[0], H=k.shape[1], D=k.shape[2]))


# Attention-output relative error on the captured tensors, all six layers. Bounds sit ~15% above
# the figures in docs/codecs.md: a regression in any kernel or layout crosses them.
ATTENTION_BOUNDS = {"fp16": 1e-3, "q8": 0.0125, "k4v4": 0.10, "tq4": 0.145, "tq3": 0.275, "tq3m": 0.237,
                    "tq3s": 0.326, "tq2s": 0.419}


@needs_cli
@needs_fixtures
@pytest.mark.parametrize("codec", sorted(ATTENTION_BOUNDS))
def test_attention_output_error_is_within_bounds(tmp_path, layers, codec):
    refs = [E.causal_attention(q, k, v) for q, k, v in layers]
    num = den = 0.0
    for (q, k, v), ref in zip(layers, refs):
        k2, v2, _ = roundtrip(tmp_path, codec, k, v)
        out = E.causal_attention(q, k2, v2)
        num += float(np.sum((out - ref) ** 2))
        den += float(np.sum(ref ** 2))
    err = (num / den) ** 0.5
    assert err < ATTENTION_BOUNDS[codec], f"{codec}: attention-output relative error {err:.4f}"
    if codec != "fp16":
        assert err > 1e-3, f"{codec} lost nothing: is it quantizing at all?"


@needs_cli
@needs_fixtures
def test_model_quality_through_the_cli(tmp_path):
    """Two windows of held-out prose with every token's K/V round-tripped through the CLI."""
    tinyllama, model = E.load_model(FIXTURES)
    data = open(E.DEFAULT_TEXT, "rb").read()
    base = E.bpb(tinyllama, model, data, 2)
    for codec, limit in (("k4v4", 1.0), ("tq3m", 2.0)):
        backend = E.CliBackend(codec, 256, KVTIER)
        try:
            changed = E.bpb(tinyllama, model, data, 2, backend.roundtrip)
        finally:
            backend.close()
        change = 100.0 * (changed - base) / base
        assert change < limit, f"{codec}: bits-per-byte moved {change:+.2f}% on 2 windows"


@needs_cli
def test_cli_errors_are_clear(tmp_path):
    r = run_cli("codec", "bench", "--codec", "k9v9")
    assert r.returncode != 0 and "kvtier codec list" in r.stderr
    x = np.zeros((4, 1, 32), dtype=np.float32)
    np.save(tmp_path / "k.npy", x)
    r = run_cli("codec", "roundtrip", "--codec", "k4v4", "--keys", str(tmp_path / "k.npy"), "--values",
                str(tmp_path / "k.npy"), "--out-keys", str(tmp_path / "a.npy"), "--out-values", str(tmp_path / "b.npy"))
    assert r.returncode != 0 and "astype(np.float16)" in r.stderr
    bad = np.full((4, 1, 32), np.nan, dtype=np.float16)
    np.save(tmp_path / "n.npy", bad)
    r = run_cli("codec", "roundtrip", "--codec", "k4v4", "--keys", str(tmp_path / "n.npy"), "--values",
                str(tmp_path / "n.npy"), "--out-keys", str(tmp_path / "a.npy"), "--out-values", str(tmp_path / "b.npy"))
    assert r.returncode != 0 and "non-finite" in r.stderr


def encoded_bytes(tmp_path, codec, k, v, page_tokens=256):
    """The CLI's encoded sections (`--out-encoded`) and the NumPy reference's, page by page."""
    paths = {n: str(tmp_path / n) for n in ("k.npy", "v.npy", "k2.npy", "v2.npy", "enc.bin")}
    np.save(paths["k.npy"], k.astype(np.float16))
    np.save(paths["v.npy"], v.astype(np.float16))
    r = run_cli("codec", "roundtrip", "--codec", codec, "--keys", paths["k.npy"], "--values", paths["v.npy"],
                "--out-keys", paths["k2.npy"], "--out-values", paths["v2.npy"], "--out-encoded", paths["enc.bin"],
                "--page-tokens", str(page_tokens), "--json")
    assert r.returncode == 0, r.stderr
    got = np.frombuffer(open(paths["enc.bin"], "rb").read(), dtype=np.uint8)
    k, v = k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)
    ref = b"".join(C.tqx_encode_section(codec, k[a:a + page_tokens], v[a:a + page_tokens])
                   for a in range(0, k.shape[0], page_tokens))
    return got, np.frombuffer(ref, dtype=np.uint8)


@needs_cli
@pytest.mark.parametrize("codec", MIXED)
def test_mixed_codecs_write_the_reference_bytes_on_synthetic_pages(tmp_path, codec):
    """Full, short and one-token pages, H = 3, D = 64 and 1 x 32 and 2 x 256: byte for byte, and
    the decoded values bit for bit."""
    rng = np.random.default_rng(13)
    for tokens, heads, dim, page in ((300, 3, 64, 256), (5, 1, 32, 256), (40, 2, 256, 16), (33, 2, 128, 32)):
        k = rng.standard_normal((tokens, heads, dim)) * 1.5 + rng.standard_normal((1, heads, dim)) * 4
        v = rng.standard_normal((tokens, heads, dim))
        got, ref = encoded_bytes(tmp_path, codec, k, v, page)
        assert got.size == ref.size and np.array_equal(got, ref), f"{codec} {k.shape} pages of {page}: {(got != ref).sum()} bytes differ"
        # ... and decodes them to the reference's values, bit for bit.
        rk, rv = C.roundtrip(codec, k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32), page)
        np.testing.assert_array_equal(np.load(tmp_path / "k2.npy"), rk.astype(np.float16))
        np.testing.assert_array_equal(np.load(tmp_path / "v2.npy"), rv.astype(np.float16))


@needs_cli
@needs_fixtures
@pytest.mark.parametrize("codec", MIXED)
def test_mixed_codecs_write_the_reference_bytes_on_the_fixture(tmp_path, layers, codec):
    """Real K/V: sums in another order may move a borderline scale byte or code (docs/codec-layouts.md);
    on the six fixture layers (1.15 MB per codec) 0 or 1 byte differed when this was written."""
    total = differ = 0
    for q, k, v in layers:
        got, ref = encoded_bytes(tmp_path, codec, k, v)
        assert got.size == ref.size
        total += got.size
        differ += int((got != ref).sum())
    assert differ <= total // 100_000, f"{codec}: {differ} of {total} bytes differ from the NumPy reference"
