#!/usr/bin/env python3
"""NumPy reference implementations of the KVTier KV codecs (quantize -> dequantize).

Follows docs/codec-layouts.md: float32 arithmetic, every stored scale / minimum / norm / mean
rounded to float16 (round to nearest even) exactly where the layout page says, codes chosen with
round-to-nearest-even, outputs rounded to float16 (the element type of the cache).

The token axis is cut into pages of `page_tokens` (256) tokens, the last one possibly shorter;
every page is quantized independently (k4v4 key groups of 32 tokens start at each page start;
per-page channel means / stds are per page).

Public API:
    CODECS                      name -> Codec
    roundtrip(name, k, v)       k, v: [T, H, D] arrays -> (k2, v2) float32 (values exact in fp16)
    section_bytes(name, T, H, D) -> (key_bytes, value_bytes) of one page section of T tokens
    bits_per_element(name, T=256, H=2, D=128) -> exact stored bits / element (keys + values),
                                 summed over the pages of a T-token sequence
Building blocks (used by explore_aggressive.py): Part, Design, tq_vectors, asym_groups, ...
"""
import math
from dataclasses import dataclass, field

import numpy as np

PAGE_TOKENS = 256
F32 = np.float32

# ----------------------------------------------------------------------------- helpers

def f16(a):
    """Round float32 -> nearest float16 (RNE, overflow -> inf) and widen back to float32."""
    return np.asarray(a, dtype=F32).astype(np.float16).astype(F32)


def _safe_inv(s):
    """inv = s > 0 ? 1 / s : 0 (float32)."""
    s = np.asarray(s, dtype=F32)
    out = np.zeros_like(s)
    np.divide(F32(1), s, out=out, where=s > 0)
    return out


def _page_ranges(T, page_tokens=PAGE_TOKENS):
    return [(a, min(a + page_tokens, T)) for a in range(0, T, page_tokens)]


# ----------------------------------------------------------------------------- q8

def q8_vectors(x):
    """int8 per vector (last axis), scale f16(amax/127)."""
    x = np.asarray(x, dtype=F32)
    amax = np.abs(x).max(axis=-1, keepdims=True)
    s = f16(amax / F32(127))
    inv = _safe_inv(s)
    code = np.clip(np.rint(x * inv), -127, 127).astype(F32)
    return code * s


# ----------------------------------------------------------------------------- asymmetric (KIVI) groups

def asym_groups(x, bits, axis):
    """Asymmetric b-bit min/scale quantization with one (min, scale) per slice along `axis`
    (x is a group: the reduction runs over `axis`). m = f16(lo), s = f16((hi-lo)/(2^b-1)),
    code = clamp(rne((x-m)*inv), 0, 2^b-1), decode fma(code, s, m)."""
    x = np.asarray(x, dtype=F32)
    qmax = (1 << bits) - 1
    lo = x.min(axis=axis, keepdims=True)
    hi = x.max(axis=axis, keepdims=True)
    m = f16(lo)
    s = f16((hi - lo) / F32(qmax))
    inv = _safe_inv(s)
    code = np.clip(np.rint((x - m) * inv), 0, qmax).astype(F32)
    # fma(code, s, m): code*s is exact in float32 (<= 8-bit int times 11-bit fp16), so the
    # single rounding of the add equals the fused result.
    return (code.astype(np.float64) * s + m).astype(F32)


def kivi_channel(x, bits, group=32):
    """Keys: per (h, d) channel over groups of `group` tokens (x is one page [T, H, D])."""
    out = np.empty_like(x, dtype=F32)
    for a in range(0, x.shape[0], group):
        out[a:a + group] = asym_groups(x[a:a + group], bits, axis=0)
    return out


def kivi_token(x, bits, group=32):
    """Values: per (t, h) over groups of `group` channels."""
    T, H, D = x.shape
    g = x.reshape(T, H, D // group, group)
    return asym_groups(g, bits, axis=-1).reshape(T, H, D)


# ----------------------------------------------------------------------------- tq (Hadamard + Lloyd-Max)

CODEBOOKS = {
    2: np.array([-1.5104176, -0.4527800, 0.4527800, 1.5104176], dtype=F32),
    3: np.array([-2.1519456, -1.3439093, -0.7560053, -0.2450942,
                 0.2450942, 0.7560053, 1.3439093, 2.1519456], dtype=F32),
    4: np.array([-2.7325895, -2.0690172, -1.6180464, -1.2562312, -0.9423404, -0.6567591,
                 -0.3880483, -0.1283950, 0.1283950, 0.3880483, 0.6567591, 0.9423404,
                 1.2562312, 1.6180464, 2.0690172, 2.7325895], dtype=F32),
}
BOUNDARIES = {b: ((L[:-1] + L[1:]) / F32(2)).astype(F32) for b, L in CODEBOOKS.items()}

_SIGNS = {}


TQ_SEED = 0x6B76746965720001


def hadamard_signs(D, seed=TQ_SEED):
    """sign[0..D) from SplitMix64 (layout page), as float32 +-1. Other seeds: exploration only."""
    if (D, seed) in _SIGNS:
        return _SIGNS[(D, seed)]
    M = (1 << 64) - 1
    state = seed
    out = np.empty(D, dtype=F32)
    for i in range(D):
        state = (state + 0x9E3779B97F4A7C15) & M
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        z ^= z >> 31
        out[i] = -1.0 if (z >> 63) == 1 else 1.0
    _SIGNS[(D, seed)] = out
    return out


def fwht(y):
    """Unnormalized Walsh-Hadamard transform along the last axis (float32), same butterflies
    as the layout page: stages len = 1, 2, 4, ..., D/2; (a, b) -> (a + b, a - b)."""
    y = np.asarray(y, dtype=F32)
    shape = y.shape
    D = shape[-1]
    y = y.reshape(-1, D)
    n = 1
    while n < D:
        z = y.reshape(-1, D // (2 * n), 2, n)
        a, b = z[:, :, 0, :], z[:, :, 1, :]
        y = np.stack([a + b, a - b], axis=2).reshape(-1, D)
        n *= 2
    return y.reshape(shape)


def tq_vectors(x, bits, return_parts=False, seed=TQ_SEED):
    """tq encode+decode of every vector along the last axis (D a power of two, 32..256)."""
    x = np.asarray(x, dtype=F32)
    shape = x.shape
    D = shape[-1]
    assert D & (D - 1) == 0 and 32 <= D <= 256, "tq needs D a power of two in 32...256"
    L, B = CODEBOOKS[bits], BOUNDARIES[bits]
    sign = hadamard_signs(D, seed)
    y = fwht(sign * x.reshape(-1, D))
    rms = np.sqrt((y * y).sum(-1, keepdims=True, dtype=F32) / F32(D)).astype(F32)
    zero = rms == 0
    z = y / np.where(zero, F32(1), rms)
    code = np.searchsorted(B, z, side="right")
    code = np.where(zero, 1 << (bits - 1), code)
    lv = L[code]
    num = (y * lv).sum(-1, keepdims=True, dtype=F32)
    den = (lv * lv).sum(-1, keepdims=True, dtype=F32)
    alpha = np.where(zero, F32(0), f16(num / den))
    yhat = (alpha * lv).astype(F32)
    xhat = (sign * fwht(yhat) / F32(D)).astype(F32)
    if return_parts:
        return xhat.reshape(shape), code, alpha
    return xhat.reshape(shape)


# ----------------------------------------------------------------------------- generic designs

@dataclass(frozen=True)
class Part:
    """How one part (keys or values) of a page section is stored.

    method: 'fp16' | 'q8' | 'tq' (per-vector Hadamard+Lloyd-Max, one fp16 alpha per vector)
            | 'kivi_c' (per channel over `group` tokens) | 'kivi_t' (per token over `group` channels)
    center: subtract a per-page per-(h, d) mean, stored fp16 (H*D*2 bytes)
    scale:  divide by a per-page per-(h, d) std, stored fp16 (H*D*2 bytes), multiply back after
    """
    method: str
    bits: int = 16
    group: int = 32
    center: bool = False
    scale: bool = False
    seed: int = TQ_SEED  # Hadamard sign seed; anything but the default is for exploration only

    def nbytes(self, T, H, D):
        n = 0
        if self.center:
            n += H * D * 2
        if self.scale:
            n += H * D * 2
        if self.method == "fp16":
            n += T * H * D * 2
        elif self.method == "q8":
            n += T * H * (D + 2)
        elif self.method == "tq":
            n += T * H * (2 + D * self.bits // 8)
        elif self.method == "kivi_c":
            n += math.ceil(T / self.group) * H * D * 4 + T * H * D * self.bits // 8
        elif self.method == "kivi_t":
            n += T * H * (D // self.group) * (4 + self.group * self.bits // 8)
        else:
            raise ValueError(self.method)
        return n

    def page_roundtrip(self, x):
        """x: one page [T, H, D] float32, exactly representable in fp16. Returns float32
        decoded values (not yet rounded to the output element type)."""
        x = np.asarray(x, dtype=F32)
        m = None
        s = None
        u = x
        if self.center:
            # m[h, d] = f16((sum over the page's tokens of x[t, h, d]) / T), float32 sum in any order
            m = f16(x.sum(axis=0, dtype=F32) / F32(x.shape[0]))[None]
            u = u - m
        if self.scale:
            # std of the (centered, if any) data around the stored mean; computed on x - m
            c = x - (m if m is not None else f16(x.mean(axis=0, dtype=np.float64).astype(F32))[None])
            s = f16(np.sqrt((c.astype(np.float64) ** 2).mean(axis=0)).astype(F32))[None]
            u = u * _safe_inv(s)
        if self.method == "fp16":
            r = f16(u)
        elif self.method == "q8":
            r = q8_vectors(u)
        elif self.method == "tq":
            r = tq_vectors(u, self.bits, seed=self.seed)
        elif self.method == "kivi_c":
            r = kivi_channel(u, self.bits, self.group)
        elif self.method == "kivi_t":
            r = kivi_token(u, self.bits, self.group)
        else:
            raise ValueError(self.method)
        if s is not None:
            r = r * s
        if m is not None:
            r = r + m
        return r.astype(F32)

    def label(self):
        pre = ("m" if self.center else "") + ("s" if self.scale else "")
        core = {"fp16": "fp16", "q8": "q8", "tq": f"tq{self.bits}",
                "kivi_c": f"kc{self.bits}/{self.group}", "kivi_t": f"kt{self.bits}/{self.group}"}[self.method]
        return (pre + "+" if pre else "") + core


@dataclass(frozen=True)
class Design:
    keys: Part
    values: Part
    note: str = ""

    def section_bytes(self, T, H, D):
        return self.keys.nbytes(T, H, D), self.values.nbytes(T, H, D)

    def roundtrip(self, k, v, page_tokens=PAGE_TOKENS):
        k = f16(k)  # the cache holds float16 elements
        v = f16(v)
        k2 = np.empty_like(k)
        v2 = np.empty_like(v)
        for a, b in _page_ranges(k.shape[0], page_tokens):
            k2[a:b] = self.keys.page_roundtrip(k[a:b])
            v2[a:b] = self.values.page_roundtrip(v[a:b])
        return f16(k2), f16(v2)  # outputs rounded to the element type

    def label(self):
        return f"K {self.keys.label()} / V {self.values.label()}"


def design_bits_per_element(design, T=PAGE_TOKENS, H=2, D=128, page_tokens=PAGE_TOKENS):
    total = 0
    for a, b in _page_ranges(T, page_tokens):
        kb, vb = design.section_bytes(b - a, H, D)
        total += kb + vb
    return 8.0 * total / (2 * T * H * D)


# ----------------------------------------------------------------------------- named codecs

CODECS = {
    "fp16": Design(Part("fp16"), Part("fp16"), "float16 cache (the rounding of the cache itself)"),
    "q8": Design(Part("q8", 8), Part("q8", 8), "int8 per token, fp16 scale"),
    "k4v4": Design(Part("kivi_c", 4, 32), Part("kivi_t", 4, 32), "KIVI-4: K per channel / 32 tokens, V per token / 32 channels"),
    "tq4": Design(Part("tq", 4), Part("tq", 4), "Hadamard + Lloyd-Max 4-bit, fp16 norm per vector"),
    "tq3": Design(Part("tq", 3), Part("tq", 3), "Hadamard + Lloyd-Max 3-bit, fp16 norm per vector"),
    "tq2": Design(Part("tq", 2), Part("tq", 2), "Hadamard + Lloyd-Max 2-bit, fp16 norm per vector"),
}
# The aggressive codec (<= 3.5 b/el) chosen in Benchmarks/quality/README.md: per page, a float16
# mean per (h, d) channel is subtracted from keys and from values, and the centered vectors are
# stored as tq3 blocks. 3.1875 bits/element for pages of 256 tokens, H = 2, D = 128.
CODECS["tq3m"] = Design(Part("tq", 3, center=True), Part("tq", 3, center=True),
                        "per-page channel mean (fp16) + Hadamard + Lloyd-Max 3-bit, K and V")
AGGRESSIVE_NAME = "tq3m"


def register(name, design):
    CODECS[name] = design


def roundtrip(name, k, v, page_tokens=PAGE_TOKENS):
    return CODECS[name].roundtrip(k, v, page_tokens)


def section_bytes(name, T, H, D):
    return CODECS[name].section_bytes(T, H, D)


def bits_per_element(name, T=PAGE_TOKENS, H=2, D=128, page_tokens=PAGE_TOKENS):
    """Exact stored bits per element (keys and values together) of a T-token sequence cut into
    pages of page_tokens; T = 256 gives the figure for one full page."""
    return design_bits_per_element(CODECS[name], T, H, D, page_tokens)


if __name__ == "__main__":
    for n in CODECS:
        print(f"{n:8s} {bits_per_element(n):.4f} b/el   {CODECS[n].label()}")


# ----------------------------------------------------------------------------- byte-exact tq3m section

def pack_codes(code, bits):
    """code: [N, D] ints -> [N, D*bits/8] uint8 using pack4 / pack3 / pack2 blocks of 32."""
    code = np.asarray(code, dtype=np.uint32)
    N, D = code.shape
    c = code.reshape(N, D // 32, 32)
    if bits == 4:
        out = (c[..., :16] | (c[..., 16:] << 4)).astype(np.uint8)
    else:
        lo = c & 3
        p2 = (lo[..., 0:8] | lo[..., 8:16] << 2 | lo[..., 16:24] << 4 | lo[..., 24:32] << 6).astype(np.uint8)
        if bits == 2:
            out = p2
        else:
            hi = ((c >> 2) & 1) << np.arange(32, dtype=np.uint32)
            w = hi.sum(-1, dtype=np.uint32)[..., None]
            out = np.concatenate([p2, w.astype("<u4").view(np.uint8).reshape(N, D // 32, 4)], -1)
    return out.reshape(N, -1)


def unpack_codes(buf, bits, D):
    buf = np.asarray(buf, dtype=np.uint8).reshape(-1, D // 32, 32 * bits // 8).astype(np.uint32)
    if bits == 4:
        c = np.concatenate([buf & 15, buf >> 4], -1)
    else:
        p2 = buf[..., :8]
        c = np.concatenate([(p2 >> s) & 3 for s in (0, 2, 4, 6)], -1)
        if bits == 3:
            w = buf[..., 8:12].copy().astype(np.uint8).view("<u4").astype(np.uint32)  # [N, D/32, 1]
            c = c | (((w >> np.arange(32, dtype=np.uint32)) & 1) << 2)
    return c.reshape(-1, D).astype(np.int64)


def _tq_part_bytes(u, bits):
    T, H, D = u.shape
    _, code, alpha = tq_vectors(u, bits, return_parts=True)
    a = alpha.reshape(-1, 1).astype("<f2").view(np.uint8)  # [T*H, 2]
    return np.concatenate([a, pack_codes(code.reshape(-1, D), bits)], 1).tobytes()


def tq3m_encode_section(k, v):
    """Bytes of one tq3m section (one layer of one page): keys part then values part, each
    [mean: H*D fp16][for each (t, h): alpha fp16, pack3 codes]. k, v: [T, H, D] fp16 values."""
    out = b""
    for x in (k, v):
        x = f16(x)
        m = f16(x.sum(axis=0, dtype=F32) / F32(x.shape[0]))
        out += m.astype("<f2").tobytes() + _tq_part_bytes(x - m[None], 3)
    return out


def tq3m_decode_section(buf, T, H, D):
    buf = memoryview(buf)
    parts, off = [], 0
    sign = hadamard_signs(D)
    L = CODEBOOKS[3]
    for _ in range(2):
        m = np.frombuffer(buf[off:off + H * D * 2], dtype="<f2").astype(F32).reshape(H, D)
        off += H * D * 2
        rec = np.frombuffer(buf[off:off + T * H * (2 + 3 * D // 8)], dtype=np.uint8).reshape(T * H, 2 + 3 * D // 8)
        off += rec.size
        alpha = rec[:, :2].copy().view("<f2").astype(F32)  # [T*H, 1]
        code = unpack_codes(rec[:, 2:], 3, D)
        x = (sign * fwht((alpha * L[code]).astype(F32)) / F32(D)).astype(F32)
        parts.append(f16(x.reshape(T, H, D) + m[None]))
    assert off == len(buf)
    return parts[0], parts[1]
