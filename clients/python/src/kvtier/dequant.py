"""Decoders of kvtierd's quantized page sections in PyTorch, on any device.

A section is the keys and values of one layer of one page, ``[T, H, D]`` each, in the bytes of
one quantizer (docs/codec-layouts.md, without the lossless frame). ``decode_sections`` turns a
batch of equally shaped sections, a uint8 tensor ``[..., section_bytes]`` on the CPU or a GPU,
into keys and values ``[..., T, H, D]`` of the element type: the bytes of a 4-bit page cross
PCIe (3.2x fewer than fp16's for k4v4 at D = 128) and are expanded where attention needs them.

The arithmetic is the layout page's, step for step, so the result is the same bits as
kvtierd's C decoder (``clients/python/tests/test_dequant.py`` checks it against ``kvtier codec
roundtrip``): k4v4 ``code * s + m`` in float32 (the product is exact, so this is the layout's
``fma``), q8 ``code * s``, tq ``alpha * L[code]``, the Walsh-Hadamard stages in the layout's
order, then ``sign * x / D``; rounding to float16 or bfloat16 is to nearest even.

Codecs: ``fp16``, ``q8``, ``k4v4``, ``tq4``, ``tq3``. A stored scale, minimum or alpha that is
NaN or infinite (or a negative scale) is a corrupt section: ``check=True`` (the default) raises
``ValueError`` for it, as the C decoder refuses it; that costs one reduction and a device
synchronisation per call.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Tuple

try:
    import torch as _torch
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("kvtier.dequant needs PyTorch: pip install torch (kvtier itself needs only NumPy)") from e

CODECS = ("fp16", "q8", "k4v4", "tq4", "tq3")

_TQ_SEED = 0x6B76746965720001
_M64 = (1 << 64) - 1
_LEVELS = {
    3: (-2.1519456, -1.3439093, -0.7560053, -0.2450942, 0.2450942, 0.7560053, 1.3439093, 2.1519456),
    4: (-2.7325895, -2.0690172, -1.6180464, -1.2562312, -0.9423404, -0.6567591, -0.3880483, -0.1283950,
        0.1283950, 0.3880483, 0.6567591, 0.9423404, 1.2562312, 1.6180464, 2.0690172, 2.7325895),
}


def _part_bytes(codec: str, T: int, H: int, D: int) -> Tuple[int, int]:
    """Bytes of the keys part and of the values part of one section."""
    if codec == "fp16":
        return T * H * D * 2, T * H * D * 2
    if codec == "q8":
        return T * H * (D + 2), T * H * (D + 2)
    if codec == "k4v4":
        if D % 32:
            raise ValueError(f"k4v4 needs a head dim that is a multiple of 32, not {D}")
        return -(-T // 32) * H * D * 4 + T * H * D // 2, T * H * (D // 32) * 20
    if codec in ("tq4", "tq3"):
        if D not in (32, 64, 128, 256):
            raise ValueError(f"{codec} needs a head dim of 32, 64, 128 or 256, not {D}")
        n = T * H * (2 + D * int(codec[2]) // 8)
        return n, n
    raise ValueError(f"no torch decoder for codec {codec!r}; these have one: {', '.join(CODECS)}")


def section_bytes(codec: str, tokens: int, kv_heads: int, head_dim: int) -> int:
    """Bytes of one section of ``codec`` for ``[tokens, kv_heads, head_dim]`` keys and values."""
    if tokens < 1 or kv_heads < 1 or head_dim < 1:
        raise ValueError(f"a section needs a positive shape, not [{tokens}, {kv_heads}, {head_dim}]")
    k, v = _part_bytes(codec, tokens, kv_heads, head_dim)
    return k + v


def decode_sections(codec: str, data, tokens: int, kv_heads: int, head_dim: int, dtype=None,
                    check: bool = True):
    """Keys and values ``[..., tokens, kv_heads, head_dim]`` of the sections in ``data``.

    ``data``: a uint8 tensor ``[..., section_bytes(codec, tokens, kv_heads, head_dim)]`` (any
    device; the leading dimensions, e.g. pages and layers, are kept). ``dtype``:
    ``torch.float16`` (default) or ``torch.bfloat16``, the element type the page was stored in.
    """
    dtype = _torch.float16 if dtype is None else dtype
    if dtype not in (_torch.float16, _torch.bfloat16):
        raise ValueError(f"sections hold float16 or bfloat16 elements, not {dtype}")
    if not isinstance(data, _torch.Tensor) or data.dtype != _torch.uint8:
        raise TypeError("data must be a uint8 torch.Tensor of section bytes")
    T, H, D = int(tokens), int(kv_heads), int(head_dim)
    kb, vb = _part_bytes(codec, T, H, D)
    if data.dim() == 0 or data.shape[-1] != kb + vb:
        raise ValueError(f"a {codec} section of [{T}, {H}, {D}] is {kb + vb} bytes; data's last dimension is "
                         f"{data.shape[-1] if data.dim() else 'missing'}")
    lead = tuple(data.shape[:-1])
    flat = data.reshape(-1, kb + vb)
    keys_part, values_part = flat[:, :kb], flat[:, kb:]
    if codec == "fp16":
        keys, values = keys_part.contiguous().view(dtype), values_part.contiguous().view(dtype)
    elif codec == "q8":
        keys, values = _q8(keys_part, T * H, D, check), _q8(values_part, T * H, D, check)
    elif codec == "k4v4":
        keys, values = _k4v4_keys(keys_part, T, H * D, check), _k4v4_values(values_part, T * H * D // 32, check)
    else:
        bits = int(codec[2])
        keys, values = _tq(keys_part, T * H, D, bits, check), _tq(values_part, T * H, D, bits, check)
    shape = lead + (T, H, D)
    return keys.to(dtype).reshape(shape), values.to(dtype).reshape(shape)


# ---------------------------------------------------------------- pieces

def _f16(b):
    """fp16 values of little-endian byte pairs ``[..., 2n]`` -> float32 ``[..., n]``."""
    return b.contiguous().view(_torch.float16).float()


def _corrupt(what: str):
    raise ValueError(f"corrupt section: {what}")


def _check_finite(v, what: str):
    if not bool(_torch.isfinite(v).all()):
        _corrupt(f"a {what} that is NaN or infinite")


def _check_scale(s, what: str):
    # The C decoder's rule: NaN, infinite or below zero (−0 passes) is corrupt.
    if not bool((_torch.isfinite(s) & (s >= 0)).all()):
        _corrupt(f"a {what} that is NaN, infinite or negative")


def _unpack4(b):
    """``pack4`` bytes ``[..., 16k]`` -> codes ``[..., 32k]`` (byte i: codes i and i + 16)."""
    blocks = b.reshape(b.shape[:-1] + (-1, 16))
    codes = _torch.cat((blocks & 15, blocks >> 4), dim=-1)
    return codes.reshape(b.shape[:-1] + (-1,))


def _unpack3(b):
    """``pack3`` bytes ``[..., 12k]`` -> codes ``[..., 32k]``."""
    blocks = b.reshape(b.shape[:-1] + (-1, 12))
    low = blocks[..., :8]
    codes = _torch.cat((low & 3, (low >> 2) & 3, (low >> 4) & 3, low >> 6), dim=-1)
    shifts = _torch.arange(8, device=b.device, dtype=_torch.uint8)
    high = ((blocks[..., 8:12, None] >> shifts) & 1).reshape(blocks.shape[:-1] + (32,))
    return (codes | (high << 2)).reshape(b.shape[:-1] + (-1,))


def _q8(part, vectors, D, check):
    rows = part.reshape(-1, vectors, D + 2)
    s = _f16(rows[..., :2])
    if check:
        _check_scale(s, "q8 scale")
    codes = rows[..., 2:].contiguous().view(_torch.int8).float()
    return codes * s


def _k4v4_values(part, groups, check):
    rows = part.reshape(-1, groups, 20)
    m, s = _f16(rows[..., 0:2]), _f16(rows[..., 2:4])
    if check:
        _check_finite(m, "k4v4 minimum")
        _check_scale(s, "k4v4 scale")
    return _unpack4(rows[..., 4:]).float() * s + m


def _k4v4_keys(part, T, HD, check):
    """The keys part: whole groups of 32 tokens in one pass, then a shorter last group if any."""
    n = part.shape[0]
    full, tail = divmod(T, 32)
    group_bytes = 4 * HD + 16 * HD
    pieces = [(part[:, :full * group_bytes].reshape(n, full, group_bytes), 32)] if full else []
    if tail:
        pieces.append((part[:, full * group_bytes:].reshape(n, 1, -1), tail))
    mins = [_f16(g[..., :2 * HD]) for g, _ in pieces]                 # [n, groups, HD]
    scales = [_f16(g[..., 2 * HD:4 * HD]) for g, _ in pieces]
    if check:
        _check_finite(_torch.cat(mins, 1), "k4v4 minimum")
        _check_scale(_torch.cat(scales, 1), "k4v4 scale")
    out = []
    for (g, nt), m, s in zip(pieces, mins, scales):
        codes = _unpack4(g[..., 4 * HD:].reshape(n, g.shape[1], nt, HD // 2)).float()  # [n, groups, nt, HD]
        out.append((codes * s[:, :, None, :] + m[:, :, None, :]).reshape(n, -1, HD))
    return out[0] if len(out) == 1 else _torch.cat(out, dim=1)


@lru_cache(maxsize=None)
def _signs(D: int) -> Tuple[float, ...]:
    state, signs = _TQ_SEED, []
    for _ in range(D):
        state = (state + 0x9E3779B97F4A7C15) & _M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        z ^= z >> 31
        signs.append(-1.0 if z >> 63 else 1.0)
    return tuple(signs)


def _fwht(y):
    """The unnormalized Walsh-Hadamard transform over the last dimension, stages 1, 2, ..., D/2:
    the same additions, in the same order, as the C kernel."""
    D = y.shape[-1]
    lead = y.shape[:-1]
    step = 1
    while step < D:
        pairs = y.reshape(lead + (D // (2 * step), 2, step))
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = _torch.stack((a + b, a - b), dim=-2).reshape(lead + (D,))
        step *= 2
    return y


def _tq(part, vectors, D, bits, check):
    rows = part.reshape(-1, vectors, 2 + D * bits // 8)
    alpha = _f16(rows[..., :2])
    if check:
        _check_finite(alpha, f"tq{bits} alpha")
    codes = (_unpack4 if bits == 4 else _unpack3)(rows[..., 2:]).long()
    levels, sign = _tq_constants(bits, D, part.device)
    y = _fwht(alpha * levels[codes])
    return sign * y * (1.0 / D)


@lru_cache(maxsize=None)
def _tq_constants(bits: int, D: int, device):
    """The codebook and the signs as float32 tensors on ``device``, made once."""
    return (_torch.tensor(_LEVELS[bits], dtype=_torch.float32, device=device),
            _torch.tensor(_signs(D), dtype=_torch.float32, device=device))
