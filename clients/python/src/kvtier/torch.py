"""Optional PyTorch helpers: tensors in, tensors out, over the NumPy path of ``kvtier.Client``.

Import as ``from kvtier.torch import put_tensors, get_tensors``; needs ``torch`` (not a
dependency of ``kvtier``). CUDA tensors are copied to host memory for a put and the result of
a get is moved to ``device``. The Transformers cache class is ``kvtier.transformers.KVTierCache``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

try:
    import torch as _torch
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("kvtier.torch needs PyTorch: pip install torch (kvtier itself needs only NumPy)") from e

from .client import Client
from .model import ModelSpec

_DTYPES = {"float16": _torch.float16, "bfloat16": _torch.bfloat16}


def torch_dtype(spec: ModelSpec):
    """The torch dtype of the KV that ``spec`` stores (float16 or bfloat16)."""
    return _DTYPES[spec.dtype]


def to_numpy(name: str, t, spec: ModelSpec) -> np.ndarray:
    """A host array of ``t``'s elements in the form ``Client.put`` takes (bfloat16 as uint16 bits)."""
    if not isinstance(t, _torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    want = _DTYPES[spec.dtype]
    if t.dtype != want:
        raise TypeError(f"{name} is {t.dtype}; model {spec.name!r} stores {want}: convert with .to({want})")
    t = t.detach()
    if t.dtype == _torch.bfloat16:
        t = t.view(_torch.int16)  # NumPy has no bfloat16: move the bit patterns
    return t.cpu().numpy().view(np.uint16 if spec.dtype == "bfloat16" else np.float16)


def from_numpy(arr: np.ndarray, spec: ModelSpec):
    """A CPU tensor sharing ``arr``'s memory (an array from ``Client.get``), typed ``spec.dtype``."""
    if spec.dtype == "bfloat16":
        return _torch.from_numpy(arr.view(np.int16)).view(_torch.bfloat16)
    return _torch.from_numpy(arr)


def _tokens(tokens):
    if isinstance(tokens, _torch.Tensor):
        return tokens.detach().cpu().numpy().astype(np.int64).ravel()
    return tokens


def put_tensors(client: Client, model: ModelSpec, tokens, keys, values, session: Optional[str] = None,
                durable: bool = False) -> int:
    """``client.put`` for torch tensors ``[layers, len(tokens), kv_heads, head_dim]`` (CPU or
    CUDA, dtype matching ``model.dtype``). Returns the cached tokens after the put."""
    return client.put(model, _tokens(tokens), to_numpy("keys", keys, model), to_numpy("values", values, model),
                      session=session, durable=durable)


def get_tensors(client: Client, model: ModelSpec, tokens, max_tokens: int = 0,
                device=None) -> Tuple["_torch.Tensor", "_torch.Tensor"]:
    """``client.get`` returning torch tensors ``[layers, served, kv_heads, head_dim]`` of the
    model's dtype, on ``device`` (default CPU)."""
    keys, values = client.get(model, _tokens(tokens), max_tokens=max_tokens)

    def convert(arr: np.ndarray):
        t = from_numpy(arr, model)
        return t if device is None else t.to(device)

    return convert(keys), convert(values)
