"""Model shapes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import _wire


MAX_DISK_CODEC_BYTES = 255


@dataclass(frozen=True)
class ModelShape:
    """The KV shape of a model, named once: per token, ``layers`` sections of keys then values,
    each ``[kv_heads, head_dim]`` 16-bit elements of ``dtype`` (``"float16"`` or ``"bfloat16"``).

    ``ModelSpec`` and ``RegisteredModel`` expose theirs as ``.shape``; the checks and the sizes
    below are the only copies in the package.
    """

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str = "float16"

    def __post_init__(self):
        for name in ("layers", "kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 1 <= v <= 0xFFFF:
                raise ValueError(f"ModelSpec.{name} must be an integer in 1...65535, got {v!r}")
        if self.dtype not in _wire.ELEMENT_TYPES:
            raise ValueError(f"ModelSpec.dtype must be one of {sorted(_wire.ELEMENT_TYPES)}, got {self.dtype!r}")

    @property
    def element_type(self) -> int:
        return _wire.ELEMENT_TYPES[self.dtype]

    @property
    def numpy_dtype(self) -> np.dtype:
        """The dtype of arrays ``get`` returns: float16, or uint16 bit patterns for bfloat16."""
        return np.dtype(np.float16) if self.dtype == "float16" else np.dtype(np.uint16)

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one token's keys and values over all layers."""
        return self.layers * 2 * self.kv_heads * self.head_dim * 2

    def kv_shape(self, tokens: int) -> tuple:
        """The shape of a keys (or values) array of ``tokens`` tokens: ``[layers, tokens, kv_heads, head_dim]``."""
        return (int(self.layers), int(tokens), int(self.kv_heads), int(self.head_dim))

    def page_shape(self, tokens: int) -> tuple:
        """The shape of a page of ``tokens`` tokens: ``[layers, 2, tokens, kv_heads, head_dim]`` (keys, then values)."""
        return (int(self.layers), 2, int(tokens), int(self.kv_heads), int(self.head_dim))

    def page_elements(self, tokens: int) -> int:
        """16-bit elements of a page of ``tokens`` tokens."""
        return int(self.layers) * 2 * int(tokens) * int(self.kv_heads) * int(self.head_dim)


@dataclass(frozen=True)
class ModelSpec:
    """The KV shape of a model: what the daemon fingerprints into a model id.

    ``dtype`` is ``"float16"`` or ``"bfloat16"``; ``page_tokens`` 0 takes the daemon's default
    (256). ``disk_codec`` is the codec the daemon writes this model's pages to disk with, e.g.
    ``"fp16"`` to keep every bit or ``"k4v4"``, ``"tq3m+zstd(3)"`` to save space (docs/codecs.md);
    empty takes the daemon's ``diskCodec`` (lossy ``k4v4`` unless configured otherwise). It is part
    of the model id: the same shape with another codec is another model. The daemon checks the
    name. Arrays passed to ``put`` are ``[layers, tokens, kv_heads, head_dim]`` of float16 for a
    float16 model and of uint16 bit patterns (or an ``ml_dtypes.bfloat16`` array) for bfloat16.
    """

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str = "float16"
    page_tokens: int = 0
    rope_theta: float = 10000.0
    disk_codec: str = ""
    #: The shape alone (``ModelShape``), built and checked from the fields above.
    shape: ModelShape = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("ModelSpec.name must be a non-empty string")
        if len(self.name.encode("utf-8")) > _wire.MAX_STRING_BYTES:
            raise ValueError(f"ModelSpec.name is over {_wire.MAX_STRING_BYTES} bytes of UTF-8")
        object.__setattr__(self, "shape", ModelShape(self.layers, self.kv_heads, self.head_dim, self.dtype))
        if not isinstance(self.page_tokens, (int, np.integer)) or not 0 <= self.page_tokens <= 0xFFFF:
            raise ValueError(f"ModelSpec.page_tokens must be an integer in 0...65535, got {self.page_tokens!r}")
        if not math.isfinite(float(self.rope_theta)):
            raise ValueError("ModelSpec.rope_theta must be finite")
        if not isinstance(self.disk_codec, str):
            raise ValueError(f"ModelSpec.disk_codec must be a codec name string (\"\" for the daemon's default), got {self.disk_codec!r}")
        if len(self.disk_codec.encode("utf-8")) > MAX_DISK_CODEC_BYTES:
            raise ValueError(f"ModelSpec.disk_codec is over {MAX_DISK_CODEC_BYTES} bytes of UTF-8; codec names are short, e.g. 'fp16'")

    @property
    def element_type(self) -> int:
        return self.shape.element_type

    @property
    def numpy_dtype(self) -> np.dtype:
        """The dtype of arrays ``get`` returns: float16, or uint16 bit patterns for bfloat16."""
        return self.shape.numpy_dtype

    @property
    def bytes_per_token(self) -> int:
        return self.shape.bytes_per_token

    def register_body(self) -> bytes:
        return _wire.register_body(self.name, int(self.layers), int(self.kv_heads), int(self.head_dim), self.element_type,
                                   int(self.page_tokens), float(self.rope_theta), self.disk_codec)

    def model_id(self, page_tokens_in_force: int = 0) -> int:
        """The id the daemon assigns this model (``page_tokens`` 0 resolves to 256, the daemon default)."""
        pt = page_tokens_in_force or self.page_tokens or 256
        return _wire.model_id(self.register_body(), pt)
