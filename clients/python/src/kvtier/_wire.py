"""Encoding and decoding of kvtierd wire protocol v1 (docs/protocol.md).

Pure functions over bytes; no sockets here. Every decoder checks lengths exactly
(trailing bytes are an error) and raises ``ProtocolViolation`` on anything that does
not parse, since a reply that does not parse means the stream cannot be trusted.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .errors import ProtocolViolation

PROTOCOL_VERSION = 2  # 2: LOOKUP replies end in vramTokens; the VRAM_* opcodes
HEADER = struct.Struct("<IHHII")
HEADER_BYTES = HEADER.size  # 16

FLAG_REPLY = 1 << 0
FLAG_FDS = 1 << 1

CAP_SHARED_MEMORY = 1 << 0

PUT_DURABLE = 1 << 0
PUT_INLINE = 1 << 1
GET_INLINE = 1 << 1
GET_PAGES = 1 << 2  # a page list follows the flags: chosen whole pages instead of the prefix

# Fixed v1 limits (ProtocolLimits); the first three are replaced by the HELLO reply's values.
MAX_CONTROL_BODY = 2 << 20
MAX_INLINE_BODY = 64 << 20
MAX_TOKENS_PER_REQUEST = 262_144
MAX_STRING_BYTES = 1024
MAX_EXTENTS = 4096
ARENA_ALIGNMENT = 4096

EXTENT = struct.Struct("<QQI")  # offset, bytes, tokens

# VRAM_POOL bounds (docs/protocol.md).
MAX_VRAM_SLOTS = 65_536
MAX_VRAM_SLOT_BYTES = 1 << 30
MAX_VRAM_HANDLE_BYTES = 1024
MAX_VRAM_UUID_BYTES = 64


class Op:
    HELLO = 0x0001
    PING = 0x0002
    REGISTER_MODEL = 0x0010
    LOOKUP = 0x0020
    PUT = 0x0021
    GET = 0x0022
    RELEASE = 0x0023
    ALLOC = 0x0024
    SESSION_LIST = 0x0030
    SESSION_INFO = 0x0031
    SESSION_PIN = 0x0032
    SESSION_TTL = 0x0033
    SESSION_FORK = 0x0034
    SESSION_DELETE = 0x0035
    SESSION_TOKENS = 0x0036
    ATTENTION = 0x0040
    QUERY_SAMPLE = 0x0041
    STATUS = 0x0050
    PAGES = 0x0051
    EVICT = 0x0052
    MODELS = 0x0053
    CODECS = 0x0054
    VRAM_POOL = 0x0060
    VRAM_PLACE = 0x0061
    VRAM_COMMIT = 0x0062
    VRAM_LEASE = 0x0063
    VRAM_DROP = 0x0064


# Opcodes whose frames may carry inline data (bounded by maxInlineBody, not maxControlBody).
INLINE_REQUESTS = frozenset({Op.PUT})
INLINE_REPLIES = frozenset({Op.GET})

ELEMENT_TYPES = {"float16": 1, "bfloat16": 2}


# ---------------------------------------------------------------- writing


def u8(v: int) -> bytes:
    return struct.pack("<B", v)


def u16(v: int) -> bytes:
    return struct.pack("<H", v)


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def string(text: str, field: str = "string") -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING_BYTES:
        raise ValueError(f"{field} is {len(raw)} bytes of UTF-8; the protocol allows {MAX_STRING_BYTES}")
    return u16(len(raw)) + raw


def token_array(tokens) -> np.ndarray:
    """Tokens as a little-endian u32 array, checking every id fits in 32 bits."""
    if isinstance(tokens, np.ndarray):
        arr = tokens
        if arr.ndim != 1:
            raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            raise TypeError(f"tokens must be integers, got dtype {arr.dtype}")
    else:
        arr = np.asarray(list(tokens) if not isinstance(tokens, (list, tuple)) else tokens)
        if arr.size == 0:
            arr = arr.astype(np.int64)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise TypeError("tokens must be a sequence of integers")
    if arr.size and arr.dtype != np.dtype("<u4"):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 0xFFFFFFFF:
            raise ValueError(f"token ids must be in 0...{0xFFFFFFFF}; got {lo if lo < 0 else hi}")
    return np.ascontiguousarray(arr, dtype="<u4")


def tokens_field(tokens: np.ndarray) -> bytes:
    return u32(len(tokens)) + tokens.tobytes()


def extents_field(extents: Sequence["Extent"]) -> bytes:
    return u32(len(extents)) + b"".join(EXTENT.pack(e.offset, e.bytes, e.tokens) for e in extents)


def frame(opcode: int, request_id: int, body: bytes = b"") -> bytes:
    return HEADER.pack(len(body), opcode, 0, request_id, 0) + body


# ---------------------------------------------------------------- reading


class Reader:
    """A cursor over a reply body; every read is bounds-checked."""

    def __init__(self, body, context: str):
        self.view = memoryview(body)
        self.at = 0
        self.context = context

    def take(self, n: int) -> memoryview:
        if n < 0 or self.at + n > len(self.view):
            raise ProtocolViolation(f"{self.context}: body ends at byte {len(self.view)}, needed {self.at + n}")
        out = self.view[self.at:self.at + n]
        self.at += n
        return out

    def unpack(self, fmt: str):
        s = struct.Struct("<" + fmt)
        return s.unpack(self.take(s.size))

    def u8(self) -> int:
        return self.unpack("B")[0]

    def u16(self) -> int:
        return self.unpack("H")[0]

    def u32(self) -> int:
        return self.unpack("I")[0]

    def u64(self) -> int:
        return self.unpack("Q")[0]

    def boolean(self, field: str) -> bool:
        v = self.u8()
        if v > 1:
            raise ProtocolViolation(f"{self.context}: {field} is {v}, not a boolean")
        return v == 1

    def string(self, field: str) -> str:
        n = self.u16()
        if n > MAX_STRING_BYTES:
            raise ProtocolViolation(f"{self.context}: {field} is {n} bytes, over {MAX_STRING_BYTES}")
        raw = bytes(self.take(n))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolViolation(f"{self.context}: {field} is not UTF-8 ({e})") from None

    def count(self, field: str, limit: int, element_bytes: int) -> int:
        n = self.u32()
        if n > limit:
            raise ProtocolViolation(f"{self.context}: {n} {field}, over the limit {limit}")
        if n * element_bytes > len(self.view) - self.at:
            raise ProtocolViolation(f"{self.context}: {n} {field} do not fit in the body")
        return n

    def tokens(self) -> np.ndarray:
        n = self.count("tokens", MAX_TOKENS_PER_REQUEST, 4)
        return np.frombuffer(bytes(self.take(4 * n)), dtype="<u4")

    def extents(self) -> List["Extent"]:
        n = self.count("extents", MAX_EXTENTS, EXTENT.size)
        return [Extent(*EXTENT.unpack(self.take(EXTENT.size))) for _ in range(n)]

    def remaining(self) -> int:
        return len(self.view) - self.at

    def finish(self) -> None:
        if self.at != len(self.view):
            raise ProtocolViolation(f"{self.context}: {len(self.view) - self.at} trailing bytes")


# ---------------------------------------------------------------- bodies


@dataclass(frozen=True)
class Extent:
    offset: int
    bytes: int
    tokens: int = 0


@dataclass(frozen=True)
class HelloReply:
    version: int
    tenant: int
    capabilities: int
    max_control_body: int
    max_inline_body: int
    max_tokens_per_request: int
    arena_bytes: int
    staging_bytes: int


def hello_request(shared_memory: bool, client_name: str) -> bytes:
    caps = CAP_SHARED_MEMORY if shared_memory else 0
    return u16(PROTOCOL_VERSION) + u16(PROTOCOL_VERSION) + u32(caps) + string(client_name[:MAX_STRING_BYTES], "clientName")


def hello_reply(body) -> HelloReply:
    r = Reader(body, "HELLO reply")
    out = HelloReply(r.u16(), r.u32(), r.u32(), r.u32(), r.u32(), r.u32(), r.u64(), r.u64())
    r.finish()
    if out.version != PROTOCOL_VERSION:
        raise ProtocolViolation(f"HELLO reply: version {out.version}, but this client asked for {PROTOCOL_VERSION} only")
    return out


def register_body(name: str, layers: int, kv_heads: int, head_dim: int, element_type: int, page_tokens: int, rope_theta: float,
                  disk_codec: str = "") -> bytes:
    """A REGISTER_MODEL body; ``disk_codec`` (when not empty) is the optional trailing field,
    sent by its canonical name when this client knows the codec (``canonical_codec``)."""
    body = (string(name, "model name") + struct.pack("<HHHBBH", layers, kv_heads, head_dim, element_type, 0, page_tokens)
            + struct.pack("<f", rope_theta))
    if disk_codec:
        body += string(canonical_codec(disk_codec) or disk_codec, "disk codec")
    return body


# The fixed part of a REGISTER_MODEL body after the name: u16 layers, u16 kvHeads, u16 headDim,
# u8 elementType, u8 zero, u16 pageTokens, f32 ropeTheta.
_REGISTER_FIXED_BYTES = 14


def model_id(register_request_body: bytes, page_tokens_in_force: int) -> int:
    """The model id the daemon derives from a REGISTER_MODEL body (docs/protocol.md): the body
    with ``pageTokens`` in force, and without the trailing disk codec when that is empty."""
    body = bytearray(register_request_body)
    name_bytes = struct.unpack_from("<H", body, 0)[0]
    page_at = 2 + name_bytes + 8
    fixed_end = 2 + name_bytes + _REGISTER_FIXED_BYTES
    if len(body) < fixed_end:
        raise ValueError(f"a REGISTER_MODEL body of {len(body)} bytes is shorter than its fixed fields ({fixed_end})")
    body[page_at:page_at + 2] = u16(page_tokens_in_force)
    if bytes(body[fixed_end:]) == b"\x00\x00":  # an empty disk codec is no codec
        del body[fixed_end:]
    digest = hashlib.blake2b(b"kvtier-model-v1\x00" + bytes(body), digest_size=8).digest()
    return int.from_bytes(digest, "little")


# Disk codec names as the daemon parses them (`Codec(name:)`, docs/codecs.md): a quantizer,
# optionally `+` and a lossless stage; case-insensitive.
CODEC_QUANTIZERS = ("fp16", "q8", "k4v4", "tq4", "tq3", "tq3m", "tq3s", "tq2s")
_ZSTD_LEVEL = re.compile(r"zstd(?:\(([+-]?[0-9]+)\)|-?([+-]?[0-9]+))\Z")


def canonical_codec(name: str):
    """The canonical name of a disk codec (the one the daemon hashes into the model id):
    ``"FP16+zstd(1)"`` → ``"fp16+zstd"``, ``"tq3m+zstd-3"`` → ``"tq3m+zstd(3)"``. None when this
    client does not know the name (a newer daemon may: it is then sent as given)."""
    quantizer, plus, stage = name.partition("+")
    quantizer = quantizer.lower()
    if quantizer not in CODEC_QUANTIZERS:
        return None
    if not plus:
        return quantizer
    stage = stage.lower()
    if stage == "lz4":
        return quantizer + "+lz4"
    if stage == "zstd":
        return quantizer + "+zstd"
    m = _ZSTD_LEVEL.match(stage)
    if m is None:
        return None
    level = int(m.group(1) if m.group(1) is not None else m.group(2))
    if not 1 <= level <= 19:
        return None
    return quantizer + ("+zstd" if level == 1 else f"+zstd({level})")


@dataclass(frozen=True)
class SessionInfo:
    """One named session of this tenant (``sessionInfo`` on the wire)."""

    name: str
    model_id: int
    tokens: int
    pinned: bool
    ttl_seconds: int
    last_used_micros: int
    ram_tokens: int
    disk_tokens: int


def read_session_info(r: Reader) -> SessionInfo:
    """A ``sessionInfo``: a SESSION_LIST entry followed by ``u32 ramTokens``, ``u32 diskTokens``."""
    e = read_session_entry(r)
    ram, disk = r.u32(), r.u32()
    return SessionInfo(e.name, e.model_id, e.tokens, e.pinned, e.ttl_seconds, e.last_used_micros, ram, disk)


# The most entries of one SESSION_LIST or MODELS reply (``ProtocolLimits.maxListEntries``): the
# requests page with ``u32 offset, u32 limit``, and the replies start with ``u32 total``.
MAX_LIST_ENTRIES = 1024


@dataclass(frozen=True)
class SessionEntry:
    """One session of a ``SESSION_LIST`` page. Where its pages are (RAM, disk) is
    ``SESSION_INFO``'s (``Client.session_info``)."""

    name: str
    model_id: int
    tokens: int
    pinned: bool
    ttl_seconds: int
    last_used_micros: int


SESSION_ENTRY_MIN_BYTES = 2 + 8 + 4 + 1 + 4 + 8


def read_session_entry(r: Reader) -> SessionEntry:
    name = r.string("name")
    model, tokens = r.u64(), r.u32()
    pinned = r.boolean("pinned")
    ttl, last = r.u32(), r.u64()
    return SessionEntry(name, model, tokens, pinned, ttl, last)


def session_list_reply(body) -> Tuple[int, List[SessionEntry]]:
    """``(total, entries)`` of one SESSION_LIST page."""
    r = Reader(body, "SESSION_LIST reply")
    total = r.u32()
    n = r.count("sessions", MAX_LIST_ENTRIES, SESSION_ENTRY_MIN_BYTES)
    out = []
    for _ in range(n):
        out.append(read_session_entry(r))
    r.finish()
    return total, out


def session_info_reply(body, context: str) -> SessionInfo:
    r = Reader(body, context)
    out = read_session_info(r)
    r.finish()
    return out


@dataclass(frozen=True)
class PageInfo:
    """One page of this tenant (``pageInfo`` of a ``PAGES`` reply)."""

    key: str  # 32 hex digits: the high then the low 64 bits
    model_id: int
    tokens: int
    in_ram: bool
    on_disk: bool
    hold: str  # "none", "session" or "pinned"
    leases: int
    heat: float
    codec_tag: int  # of the disk copy; 0 without one
    stored_bytes: int
    raw_bytes: int
    idle_micros: int


PAGE_INFO = struct.Struct("<QQQIBBHfIIIQ")
MAX_PAGES_PER_REPLY = 16384
_HOLDS = ("none", "session", "pinned")


def pages_reply(body) -> Tuple[int, List[PageInfo]]:
    r = Reader(body, "PAGES reply")
    total = r.u32()
    n = r.count("pages", MAX_PAGES_PER_REPLY, PAGE_INFO.size)
    out = []
    for _ in range(n):
        high, low, model, tokens, tiers, hold, leases, heat, codec, stored, raw, idle = PAGE_INFO.unpack(r.take(PAGE_INFO.size))
        if tiers & ~3 or hold > 2:
            raise ProtocolViolation(f"PAGES reply: tiers {tiers} or hold {hold} out of range")
        out.append(PageInfo(f"{high:016x}{low:016x}", model, tokens, bool(tiers & 1), bool(tiers & 2), _HOLDS[hold],
                            leases, heat, codec, stored, raw, idle))
    r.finish()
    return total, out


@dataclass(frozen=True)
class EvictResult:
    """What ``EVICT`` did: pages moved out of RAM, deleted from disk, left alone."""

    evicted: int
    deleted: int
    skipped: int


def evict_reply(body) -> EvictResult:
    r = Reader(body, "EVICT reply")
    out = EvictResult(r.u32(), r.u32(), r.u32())
    r.finish()
    return out


@dataclass(frozen=True)
class RegisteredModel:
    """A model registered with the daemon (``MODELS``): its id and registration."""

    model_id: int
    name: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    page_tokens: int
    rope_theta: float
    disk_codec: str = ""  # empty: the daemon's configured diskCodec

    @property
    def shape(self):
        """The model's ``ModelShape``."""
        from .model import ModelShape

        return ModelShape(self.layers, self.kv_heads, self.head_dim, self.dtype)


MODEL_ENTRY_MIN_BYTES = 8 + 2 + 2 + 2 + 2 + 1 + 1 + 2 + 4
_DTYPES = {v: k for k, v in ELEMENT_TYPES.items()}


@dataclass(frozen=True)
class CodecChoice:
    """A model's disk codec as the daemon's codec policy decided it for this tenant (``CODECS``).

    ``policy``: ``fixed`` (the model's own codec, or the daemon's diskCodec under the fixed
    policy), ``measuring`` (auto, first sample not measured yet), ``chosen`` or ``fell-back``
    (a later sample measured the codec past the bound and a safer one took over). Errors are
    fractions; None when not measured."""

    model_id: int
    policy: str
    queries_from: str  # "keys" (the keys stood in for the queries) or "queries"
    codec_tag: int  # the codec new pages are written with
    attention_error: Optional[float]
    max_attention_error: Optional[float]
    last_check_error: Optional[float]
    checks: int
    fallbacks: int
    sampled_tokens: int
    sampled_layers: int
    message: str


MAX_QUERY_SAMPLE = 16  # queries per layer of one QUERY_SAMPLE (QuerySample.maxQueries)
CODEC_CHOICE = struct.Struct("<QBBIfffIIIH")
_POLICIES = ("fixed", "measuring", "chosen", "fell-back")


def codecs_reply(body) -> Tuple[int, List[CodecChoice]]:
    """``(total, choices)`` of one CODECS page."""
    r = Reader(body, "CODECS reply")
    total = r.u32()
    n = r.count("choices", MAX_LIST_ENTRIES, CODEC_CHOICE.size + 2)
    out = []
    for _ in range(n):
        mid, phase, queries, tag, err, bound, check, checks, fallbacks, tokens, layers = CODEC_CHOICE.unpack(r.take(CODEC_CHOICE.size))
        if phase > 3 or queries > 1:
            raise ProtocolViolation(f"CODECS reply: phase {phase} or queriesFrom {queries} out of range")
        def finite(x):
            return None if math.isnan(x) else x
        out.append(CodecChoice(mid, _POLICIES[phase], "keys" if queries == 0 else "queries", tag, finite(err),
                               None if phase == 0 else finite(bound), finite(check), checks, fallbacks, tokens, layers,
                               r.string("message")))
    r.finish()
    return total, out


def models_reply(body) -> Tuple[int, List[RegisteredModel]]:
    """``(total, models)`` of one MODELS page."""
    r = Reader(body, "MODELS reply")
    total = r.u32()
    n = r.count("models", MAX_LIST_ENTRIES, MODEL_ENTRY_MIN_BYTES)
    out = []
    for _ in range(n):
        mid = r.u64()
        name = r.string("name")
        layers, heads, dim, etype, codec_follows, page = r.unpack("HHHBBH")
        rope = r.unpack("f")[0]
        # In a MODELS entry the reserved byte says whether a disk codec follows ropeTheta.
        if etype not in _DTYPES or codec_follows > 1:
            raise ProtocolViolation(f"MODELS reply: element type {etype} or reserved byte {codec_follows} invalid")
        codec = r.string("disk codec") if codec_follows else ""
        out.append(RegisteredModel(mid, name, layers, heads, dim, _DTYPES[etype], page, rope, codec))
    r.finish()
    return total, out


def status_reply(body) -> dict:
    r = Reader(body, "STATUS reply")
    n = r.count("counters", MAX_CONTROL_BODY // 10, 10)
    out = {}
    for _ in range(n):
        name = r.string("counter name")
        out[name] = r.u64()
    r.finish()
    return out


def error_message(body) -> str:
    """The ``string message`` of an error reply; tolerant, since it only explains an error."""
    raw = bytes(body)
    if len(raw) >= 2:
        n = struct.unpack_from("<H", raw)[0]
        if 2 + n == len(raw):
            return raw[2:].decode("utf-8", errors="replace")
    return raw.decode("utf-8", errors="replace")


def empty_reply(body, context: str) -> None:
    if len(body):
        raise ProtocolViolation(f"{context}: expected an empty body, got {len(body)} bytes")


def get_reply_head(body, inline: bool) -> Tuple[int, int, Reader]:
    r = Reader(body, "GET reply")
    served, lease = r.u32(), r.u64()
    return served, lease, r
