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


def tq_vectors(x, bits, return_parts=False, seed=TQ_SEED, alpha_mode="ls", scale_bits=16):
    """tq encode+decode of every vector along the last axis (D a power of two, 32..256).

    bits: an int, or a fraction such as 2.5: in every block of 32 rotated coordinates the first
    round((bits - floor(bits)) * 32) get floor(bits) + 1 bits, the others floor(bits) (after the
    random-sign Hadamard transform every coordinate has the same distribution).
    alpha_mode: "ls" least-squares alpha (minimum error, shrinks the vector by cos^2 of the angle
    to its code) or "proj" (alpha = |y|^2 / y.L: the decoded vector's projection on the original is
    the original, so scores q.k and attention-weighted sums keep their scale).
    scale_bits: 16 (fp16 alpha) or 8 (log8: alpha = amax * 2^((q - 255) / 16), q in 1..255, q = 0
    for alpha 0, with amax the fp16 maximum alpha over the first axis (x is [T, H, D]: per head)).
    """
    x = np.asarray(x, dtype=F32)
    shape = x.shape
    D = shape[-1]
    assert D & (D - 1) == 0 and 32 <= D <= 256, "tq needs D a power of two in 32...256"
    lo = int(math.floor(bits))
    hi_per_block = int(round((bits - lo) * 32))  # in every block of 32 coordinates, the first ones
    sign = hadamard_signs(D, seed)
    y = fwht(sign * x.reshape(-1, D))
    rms = np.sqrt((y * y).sum(-1, keepdims=True, dtype=F32) / F32(D)).astype(F32)
    zero = rms == 0
    z = y / np.where(zero, F32(1), rms)
    code = np.searchsorted(BOUNDARIES[lo], z, side="right")
    code = np.where(zero, 1 << (lo - 1), code)
    lv = CODEBOOKS[lo][code]
    if hi_per_block:
        hi = (np.arange(D) % 32) < hi_per_block
        c_hi = np.searchsorted(BOUNDARIES[lo + 1], z, side="right")
        c_hi = np.where(zero, 1 << lo, c_hi)
        code = np.where(hi, c_hi, code)
        lv = np.where(hi, CODEBOOKS[lo + 1][c_hi], lv)
    num = (y * lv).sum(-1, keepdims=True, dtype=F32)
    den = (lv * lv).sum(-1, keepdims=True, dtype=F32)
    if alpha_mode == "ls":
        a = num / np.where(zero, F32(1), den)
    elif alpha_mode == "proj":
        a = (y * y).sum(-1, keepdims=True, dtype=F32) / np.where(zero, F32(1), num)
    else:
        raise ValueError(alpha_mode)
    a = np.where(zero, F32(0), a).astype(F32)
    if scale_bits == 16:
        alpha = f16(a)
    elif scale_bits == 8:
        alpha = log8_round(a.reshape(shape[:-1]), axis=0).reshape(a.shape)
    else:
        raise ValueError(scale_bits)
    yhat = (alpha * lv).astype(F32)
    xhat = (sign * fwht(yhat) / F32(D)).astype(F32)
    if return_parts:
        return xhat.reshape(shape), code, alpha, a.reshape(shape[:-1])
    return xhat.reshape(shape)


LOG8_STEPS = 16  # codes per octave


def log8_factors():
    """factor[q] = 2^((q - 255) / 16) in float32 (q = 1...255), factor[0] = 0."""
    f = (F32(2) ** ((np.arange(256, dtype=np.float64) - 255) / LOG8_STEPS)).astype(F32)
    f[0] = 0
    return f


def log8_codes(a, axis=0):
    """(q, amax): amax = f16(max alpha) over `axis` (keepdims), q the nearest amax * factor[q] to
    each alpha (q >= 1, ties to the smaller q), q = 0 for alpha 0."""
    a = np.asarray(a, dtype=F32)
    amax = f16(a.max(axis=axis, keepdims=True))
    cand = amax[..., None] * log8_factors()  # [..., 256]
    q = np.abs(cand - a[..., None]).argmin(-1)
    q = np.where(a > 0, np.maximum(q, 1), 0)
    return q.astype(np.uint8), amax


def log8_round(a, axis=0):
    """alpha -> amax * 2^((q - 255) / 16) with q, amax from log8_codes."""
    q, amax = log8_codes(a, axis)
    return (amax * log8_factors()[q]).astype(F32)


# ----------------------------------------------------------------------------- generic designs

@dataclass(frozen=True)
class Part:
    """How one part (keys or values) of a page section is stored.

    method: 'fp16' | 'q8' | 'tq' (per-vector Hadamard+Lloyd-Max, one alpha per vector)
            | 'kivi_c' (per channel over `group` tokens) | 'kivi_t' (per token over `group` channels)
    bits:   for 'tq' an int or a fraction (2.5: half the rotated coordinates 3-bit, half 2-bit)
    center: subtract a per-page per-(h, d) mean, stored fp16 (H*D*2 bytes)
    scale:  divide by a per-page per-(h, d) std, stored fp16 (H*D*2 bytes), multiply back after
    alpha:  'ls' (least squares) or 'proj' (projection-preserving), see tq_vectors
    scale_bits: 16 (fp16 alpha per vector) or 8 (log8 alpha per vector + one fp16 amax per head)
    resid:  after quantizing, add back the per-page per-(h, d) mean of the residual (fp16)
    """
    method: str
    bits: float = 16
    group: int = 32
    center: bool = False
    scale: bool = False
    seed: int = TQ_SEED  # Hadamard sign seed; anything but the default is for exploration only
    alpha: str = "ls"
    scale_bits: int = 16
    resid: bool = False

    def nbytes(self, T, H, D, exact=0):
        """Bytes of this part for a page of T tokens, `exact` of them kept as fp16."""
        n = exact * H * D * 2
        Tq = T - exact
        if self.center:
            n += H * D * 2
        if self.scale:
            n += H * D * 2
        if self.resid:
            n += H * D * 2
        if self.method == "fp16":
            n += Tq * H * D * 2
        elif self.method == "q8":
            n += Tq * H * (D + 2)
        elif self.method == "tq":
            bits = D * self.bits
            assert bits == int(bits) and int(bits) % 8 == 0, (self.bits, D)
            n += Tq * H * int(bits) // 8
            n += Tq * H * 2 if self.scale_bits == 16 else Tq * H + H * 2
        elif self.method == "kivi_c":
            n += math.ceil(Tq / self.group) * H * D * 4 + Tq * H * D * int(self.bits) // 8
        elif self.method == "kivi_t":
            n += Tq * H * (D // self.group) * (4 + self.group * int(self.bits) // 8)
        else:
            raise ValueError(self.method)
        return n

    def page_roundtrip(self, x, exact=None):
        """x: one page [T, H, D] float32, exactly representable in fp16; `exact`: indices of
        tokens kept as they are (left out of means and scales). Returns float32 decoded values
        (not yet rounded to the output element type)."""
        x = np.asarray(x, dtype=F32)
        if exact is not None and len(exact):
            keep = np.ones(x.shape[0], dtype=bool)
            keep[exact] = False
            out = x.copy()
            if keep.any():
                out[keep] = self.page_roundtrip(x[keep])
            return out
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
            r = tq_vectors(u, self.bits, seed=self.seed, alpha_mode=self.alpha, scale_bits=self.scale_bits)
        elif self.method == "kivi_c":
            r = kivi_channel(u, int(self.bits), self.group)
        elif self.method == "kivi_t":
            r = kivi_token(u, int(self.bits), self.group)
        else:
            raise ValueError(self.method)
        if self.resid:
            r = r + f16((u - r).sum(axis=0, dtype=F32) / F32(x.shape[0]))[None]
        if s is not None:
            r = r * s
        if m is not None:
            r = r + m
        return r.astype(F32)

    def label(self):
        pre = ("m" if self.center else "") + ("s" if self.scale else "")
        b = f"{self.bits:g}"
        core = {"fp16": "fp16", "q8": "q8", "tq": f"tq{b}",
                "kivi_c": f"kc{b}/{self.group}", "kivi_t": f"kt{b}/{self.group}"}[self.method]
        if self.method == "tq":
            core += ("p" if self.alpha == "proj" else "") + ("l" if self.scale_bits == 8 else "")
        if self.resid:
            core += "+r"
        return (pre + "+" if pre else "") + core


@dataclass(frozen=True)
class Design:
    """Keys and values parts; `exact` tokens of every page kept as fp16 in both parts (with a
    one-byte index each): 'first' = the page's first tokens (an attention sink sits at a
    sequence's start), 'dist' = the tokens whose keys lie farthest from the page's key mean."""
    keys: Part
    values: Part
    note: str = ""
    exact: int = 0
    exact_mode: str = "first"

    def section_bytes(self, T, H, D):
        e = min(self.exact, T)
        idx = e if self.exact_mode == "dist" else 0
        return self.keys.nbytes(T, H, D, e) + idx, self.values.nbytes(T, H, D, e)

    def exact_tokens(self, k):
        e = min(self.exact, k.shape[0])
        if e == 0:
            return None
        if self.exact_mode == "first":
            return np.arange(e)
        d = ((k - k.mean(axis=0, keepdims=True)) ** 2).sum(axis=(1, 2))
        return np.sort(np.argsort(-d, kind="stable")[:e])

    def roundtrip(self, k, v, page_tokens=PAGE_TOKENS):
        k = f16(k)  # the cache holds float16 elements
        v = f16(v)
        k2 = np.empty_like(k)
        v2 = np.empty_like(v)
        for a, b in _page_ranges(k.shape[0], page_tokens):
            ex = self.exact_tokens(k[a:b])
            k2[a:b] = self.keys.page_roundtrip(k[a:b], ex)
            v2[a:b] = self.values.page_roundtrip(v[a:b], ex)
        return f16(k2), f16(v2)  # outputs rounded to the element type

    def label(self):
        ex = f" / {self.exact} {self.exact_mode} exact" if self.exact else ""
        return f"K {self.keys.label()} / V {self.values.label()}{ex}"


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
# The sub-3-bit codecs of issue 13 (Benchmarks/quality/README.md, docs/codecs.md): per page the
# first token kept as given, per-channel means removed, mixed-width codes, log8 alphas.
# MIXED_PARTS: (bits, half, center) of keys and of values; byte layout in tqx_encode_section.
MIXED_PARTS = {"tq3s": ((3, False, True), (2, True, True)), "tq2s": ((2, True, True), (2, False, True))}
MIXED_EXACT = 1
for _name, _parts in MIXED_PARTS.items():
    CODECS[_name] = Design(*(Part("tq", b + (0.5 if hf else 0), center=c, scale_bits=8) for b, hf, c in _parts),
                           note="first token exact, channel means, mixed-width tq, log8 alpha",
                           exact=MIXED_EXACT, exact_mode="first")


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
    _, code, alpha, _ = tq_vectors(u, bits, return_parts=True)
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


# ----------------------------------------------------------------------------- byte-exact tq3s / tq2s sections

def _pack_mixed(code, bits, half):
    """code: [N, D] -> [N, D/32 * block] uint8: per block of 32, pack2 of the low two bits, a u32
    of bit 2 of every code when bits == 3, a u16 of bit `bits` of codes 0...15 when half."""
    code = np.asarray(code, dtype=np.uint32)
    N, D = code.shape
    c = code.reshape(N, D // 32, 32)
    lo = c & 3
    out = [(lo[..., 0:8] | lo[..., 8:16] << 2 | lo[..., 16:24] << 4 | lo[..., 24:32] << 6).astype(np.uint8)]
    if bits == 3:
        w = (((c >> 2) & 1) << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32)[..., None]
        out.append(w.astype("<u4").view(np.uint8).reshape(N, D // 32, 4))
    if half:
        w = (((c[..., :16] >> bits) & 1) << np.arange(16, dtype=np.uint32)).sum(-1, dtype=np.uint32)[..., None]
        out.append(w.astype("<u2").view(np.uint8).reshape(N, D // 32, 2))
    return np.concatenate(out, -1).reshape(N, -1)


def _unpack_mixed(buf, bits, half, D):
    block = 8 + (4 if bits == 3 else 0) + (2 if half else 0)
    b = np.asarray(buf, dtype=np.uint8).reshape(-1, D // 32, block)
    p2 = b[..., :8].astype(np.uint32)
    c = np.concatenate([(p2 >> s) & 3 for s in (0, 2, 4, 6)], -1)
    off = 8
    if bits == 3:
        w = b[..., off:off + 4].copy().view("<u4").astype(np.uint32)
        c = c | (((w >> np.arange(32, dtype=np.uint32)) & 1) << 2)
        off += 4
    if half:
        w = b[..., off:off + 2].copy().view("<u2").astype(np.uint32)
        c[..., :16] |= ((w >> np.arange(16, dtype=np.uint32)) & 1) << bits
    return c.reshape(-1, D).astype(np.int64)


def _mixed_levels(code, bits, half, D):
    hi = half & ((np.arange(D) % 32) < 16)
    return np.where(hi, CODEBOOKS[bits + 1][np.minimum(code, 2 ** (bits + 1) - 1)],
                    CODEBOOKS[bits][np.minimum(code, 2 ** bits - 1)]).astype(F32)


def tqx_encode_part(x, bits, half, center, exact=MIXED_EXACT):
    """Bytes of one part [T, H, D] (fp16 values): [first `exact` tokens as fp16][mean H*D fp16 if
    center][amax H fp16][per later (t, h): q u8, code blocks]."""
    x = f16(x)
    T, H, D = x.shape
    e = min(exact, T)
    out = x[:e].astype("<f2").tobytes()
    rest = x[e:]
    m = np.zeros((H, D), dtype=F32)
    if center:
        m = f16(rest.sum(axis=0, dtype=F32) / F32(len(rest))) if len(rest) else m
        out += m.astype("<f2").tobytes()
    u = rest - m[None]
    if len(rest) == 0:
        return out + np.zeros(H, dtype="<f2").tobytes()
    _, code, _, a = tq_vectors(u, bits + (0.5 if half else 0), return_parts=True, scale_bits=8)
    q, amax = log8_codes(a, axis=0)  # a: [T', H]
    out += amax.reshape(H).astype("<f2").tobytes()
    rec = np.concatenate([q.reshape(-1, 1), _pack_mixed(code.reshape(-1, D), bits, half)], 1)
    return out + rec.tobytes()


def tqx_decode_part(buf, T, H, D, bits, half, center, exact=MIXED_EXACT):
    """(decoded [T, H, D] float32 (fp16 values), bytes read)."""
    buf = memoryview(buf)
    e = min(exact, T)
    off = e * H * D * 2
    first = np.frombuffer(buf[:off], dtype="<f2").astype(F32).reshape(e, H, D)
    m = np.zeros((H, D), dtype=F32)
    if center:
        m = np.frombuffer(buf[off:off + H * D * 2], dtype="<f2").astype(F32).reshape(H, D)
        off += H * D * 2
    amax = np.frombuffer(buf[off:off + 2 * H], dtype="<f2").astype(F32)
    off += 2 * H
    vb = 1 + D // 32 * (8 + (4 if bits == 3 else 0) + (2 if half else 0))
    n = (T - e) * H
    rec = np.frombuffer(buf[off:off + n * vb], dtype=np.uint8).reshape(n, vb)
    off += n * vb
    alpha = (np.tile(amax, T - e) * log8_factors()[rec[:, 0]]).astype(F32)[:, None]
    code = _unpack_mixed(rec[:, 1:], bits, half, D)
    y = (alpha * _mixed_levels(code, bits, half, D)).astype(F32)
    x = (hadamard_signs(D) * fwht(y) / F32(D)).astype(F32).reshape(T - e, H, D) + m[None]
    return np.concatenate([first, f16(x)]), off


def tqx_encode_section(name, k, v):
    (kp, vp) = MIXED_PARTS[name]
    return tqx_encode_part(k, *kp) + tqx_encode_part(v, *vp)


def tqx_decode_section(name, buf, T, H, D):
    (kp, vp) = MIXED_PARTS[name]
    k, n = tqx_decode_part(buf, T, H, D, *kp)
    v, n2 = tqx_decode_part(memoryview(buf)[n:], T, H, D, *vp)
    assert n + n2 == len(buf), (n, n2, len(buf))
    return k, v
