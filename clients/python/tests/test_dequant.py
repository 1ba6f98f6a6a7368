"""kvtier.dequant (the PyTorch section decoders a GPU client runs) against kvtierd's C decoder:
``kvtier codec roundtrip --out-encoded`` encodes pages with the C kernels and decodes them; the
torch decoder, given the same encoded bytes, must give the same bits."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvtier import dequant  # noqa: E402

from conftest import REPO  # noqa: E402


def kvtier_cli():
    env = os.environ.get("KVTIER_BIN")
    if env:
        return env if os.access(env, os.X_OK) else None
    for build in ("debug", "release"):
        candidate = REPO / ".build" / build / "kvtier"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


CLI = kvtier_cli()
needs_cli = pytest.mark.skipif(CLI is None, reason="no kvtier binary (swift build)")


def kv(tokens, heads, dim, seed):
    """Keys with outlier channels and a drift over tokens, values plain normal: the shapes that
    make per-channel and per-token groups differ."""
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(tokens, heads, dim)).astype(np.float32)
    keys[:, :, ::17] *= 12.0
    keys += np.linspace(-2, 2, tokens, dtype=np.float32)[:, None, None]
    values = rng.normal(size=(tokens, heads, dim)).astype(np.float32) * 0.7
    return keys, values


def c_roundtrip(tmp_path, codec, keys, values, dtype, page_tokens):
    """(decoded keys, decoded values, encoded bytes) from the C kernels, as uint16 bit patterns."""
    def bits(a):
        t = torch.from_numpy(a).to(dtype)
        return t.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else t.numpy()

    paths = {n: str(tmp_path / f"{n}.npy") for n in ("k", "v", "k2", "v2")}
    np.save(paths["k"], bits(keys))
    np.save(paths["v"], bits(values))
    encoded = str(tmp_path / "encoded.bin")
    r = subprocess.run([CLI, "codec", "roundtrip", "--codec", codec, "--keys", paths["k"], "--values", paths["v"],
                        "--out-keys", paths["k2"], "--out-values", paths["v2"], "--page-tokens", str(page_tokens),
                        "--dtype", "bfloat16" if dtype == torch.bfloat16 else "float16", "--out-encoded", encoded,
                        "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    with open(encoded, "rb") as f:
        data = f.read()
    return np.load(paths["k2"]).view(np.uint16), np.load(paths["v2"]).view(np.uint16), data, report


def bit_patterns(t):
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


@needs_cli
@pytest.mark.parametrize("codec", dequant.CODECS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("page", [128, 20])
def test_torch_decoder_gives_the_c_decoders_bits(tmp_path, codec, dtype, page):
    # 300 tokens in pages of 128: two whole pages and one of 44 (whole k4v4 key groups and a
    # shorter last one); in pages of 20: key groups shorter than 32 only.
    tokens, heads, dim = 300, 2, 64
    keys, values = kv(tokens, heads, dim, seed=17)
    want_k, want_v, data, report = c_roundtrip(tmp_path, codec, keys, values, dtype, page)
    assert report["pages"] == -(-tokens // page)
    at = 0
    got_k, got_v = [], []
    for a in range(0, tokens, page):
        t = min(page, tokens - a)
        n = dequant.section_bytes(codec, t, heads, dim)
        section = torch.frombuffer(bytearray(data[at:at + n]), dtype=torch.uint8)
        k, v = dequant.decode_sections(codec, section, t, heads, dim, dtype)
        assert k.shape == v.shape == (t, heads, dim) and k.dtype == dtype
        got_k.append(bit_patterns(k))
        got_v.append(bit_patterns(v))
        at += n
    assert at == len(data), "the encoded file holds more than the pages' sections"
    np.testing.assert_array_equal(np.concatenate(got_k), want_k)
    np.testing.assert_array_equal(np.concatenate(got_v), want_v)


@needs_cli
@pytest.mark.parametrize("codec", ["k4v4", "tq4"])
def test_a_batch_of_sections_decodes_as_each_alone(tmp_path, codec):
    tokens, heads, dim = 256, 4, 128
    keys, values = kv(tokens * 3, heads, dim, seed=5)
    want_k, want_v, data, _ = c_roundtrip(tmp_path, codec, keys, values, torch.float16, tokens)
    batch = torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(3, -1)
    k, v = dequant.decode_sections(codec, batch, tokens, heads, dim)
    assert k.shape == (3, tokens, heads, dim)
    np.testing.assert_array_equal(bit_patterns(k.reshape(-1, heads, dim)), want_k)
    np.testing.assert_array_equal(bit_patterns(v.reshape(-1, heads, dim)), want_v)
    # The same bytes as leading dimensions [pages, layers] of a restore.
    k2, _ = dequant.decode_sections(codec, batch.reshape(1, 3, -1), tokens, heads, dim)
    assert torch.equal(k2.reshape(k.shape), k)


def test_section_sizes_follow_the_layout_page():
    # docs/codec-layouts.md: T = 256, H = 8, D = 128.
    assert dequant.section_bytes("fp16", 256, 8, 128) == 2 * 256 * 8 * 128 * 2
    assert dequant.section_bytes("q8", 256, 8, 128) == 2 * 256 * 8 * 130
    assert dequant.section_bytes("k4v4", 256, 8, 128) == (8 * 8 * 128 * 4 + 256 * 8 * 64) + 256 * 8 * 4 * 20
    assert dequant.section_bytes("tq4", 256, 8, 128) == 2 * 256 * 8 * (2 + 64)
    assert dequant.section_bytes("tq3", 256, 8, 128) == 2 * 256 * 8 * (2 + 48)
    assert dequant.section_bytes("k4v4", 33, 1, 32) == (2 * 32 * 4 + 33 * 16) + 33 * 20


def test_bad_arguments_are_refused_with_reasons():
    with pytest.raises(ValueError, match="no torch decoder"):
        dequant.section_bytes("tq3m", 256, 8, 128)
    with pytest.raises(ValueError, match="multiple of 32"):
        dequant.section_bytes("k4v4", 256, 8, 48)
    with pytest.raises(ValueError, match="head dim of 32"):
        dequant.section_bytes("tq4", 256, 8, 96)
    with pytest.raises(ValueError, match="bytes; data's last dimension"):
        dequant.decode_sections("k4v4", torch.zeros(100, dtype=torch.uint8), 16, 1, 32)
    with pytest.raises(TypeError, match="uint8"):
        dequant.decode_sections("q8", torch.zeros(34, dtype=torch.int16), 1, 1, 32)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        dequant.decode_sections("q8", torch.zeros(68, dtype=torch.uint8), 1, 1, 32, torch.float32)


@pytest.mark.parametrize("codec,offset,what", [
    ("k4v4", 0, "minimum"),                       # the first key channel's minimum
    ("k4v4", 2 * 64, "scale"),                    # the first key channel's scale (H·D = 64 mins first)
    ("q8", 0, "scale"),
    ("tq4", 0, "alpha"),
])
def test_a_corrupt_scale_is_refused_not_decoded(codec, offset, what):
    T, H, D = 32, 2, 32
    data = torch.zeros(dequant.section_bytes(codec, T, H, D), dtype=torch.uint8)
    data[offset:offset + 2] = torch.tensor([0x00, 0x7C], dtype=torch.uint8)  # fp16 +Inf
    with pytest.raises(ValueError, match=f"corrupt section: .*{what}"):
        dequant.decode_sections(codec, data, T, H, D)
    data[offset:offset + 2] = torch.tensor([0x00, 0x3C], dtype=torch.uint8)  # 1.0 decodes
    dequant.decode_sections(codec, data, T, H, D)
    if what == "scale":
        data[offset:offset + 2] = torch.tensor([0x00, 0xBC], dtype=torch.uint8)  # -1.0
        with pytest.raises(ValueError, match="negative"):
            dequant.decode_sections(codec, data, T, H, D)
