"""Optional PyTorch helpers: tensors in, tensors out, over the NumPy path of ``kvtier.Client``.

Import as ``from kvtier.torch import put_tensors, get_tensors``; needs ``torch`` (not a
dependency of ``kvtier``). CUDA tensors are copied to host memory for a put. ``get_tensors``
restores straight into ``device``: each page goes from the daemon's shared arena to the device
in one contiguous copy and is laid out there; on CUDA the arena mapping is registered with the
driver as pages are first copied (``pin_page_arena``), so those copies are DMA at PCIe speed
instead of being staged through pageable memory. The Transformers cache class is
``kvtier.transformers.KVTierCache``.
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Optional, Tuple

import numpy as np

try:
    import torch as _torch
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("kvtier.torch needs PyTorch: pip install torch (kvtier itself needs only NumPy)") from e

from .client import Client
from .model import ModelSpec

_DTYPES = {"float16": _torch.float16, "bfloat16": _torch.bfloat16}
log = logging.getLogger("kvtier")

# cudaHostRegister flags (driver_types.h): usable from every context, and read-only, which a
# PROT_READ mapping (the page arena is sealed against writes) requires.
_HOST_REGISTER_PORTABLE = 0x1
_HOST_REGISTER_READ_ONLY = 0x8


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


class _ArenaPins:
    """The parts of one client's page-arena mapping registered with CUDA.

    The arena's size is virtual (the tenant's quota plus slack) and a pinned page is committed
    memory, so it is registered in chunks of ``CHUNK`` bytes as pages in them are first
    copied, never as a whole; the daemon fills the arena from its low end, so the pinned part
    follows what the tenant stores. The arena is sealed against writes and never has holes
    punched in it, so a registered page keeps its physical memory for the mapping's life."""

    CHUNK = 64 << 20

    def __init__(self, client: Client):
        self.failed: Optional[str] = None
        self.chunks = set()
        self.lock = threading.Lock()  # a Client may be shared by threads
        arena = client.page_arena_address()
        if arena is None:
            self.failed = "the client has no shared page arena (pages come inline)"
        elif not _torch.cuda.is_available():
            self.failed = "CUDA is not available"
        else:
            self.base, self.length = arena
            self.cudart = _torch.cuda.cudart()
            client.on_unmap(self.unpin_all)

    def cover(self, address: int, length: int) -> bool:
        """Registers the chunks holding ``[address, address + length)``; False once any failed."""
        with self.lock:
            return self._cover(address, length)

    def _cover(self, address: int, length: int) -> bool:
        if self.failed is not None:
            return False
        first = (address - self.base) // self.CHUNK
        last = (address + length - 1 - self.base) // self.CHUNK
        for chunk in range(first, last + 1):
            if chunk in self.chunks:
                continue
            start = self.base + chunk * self.CHUNK
            size = min(self.CHUNK, self.length - chunk * self.CHUNK)
            err = self.cudart.cudaHostRegister(start, size, _HOST_REGISTER_PORTABLE | _HOST_REGISTER_READ_ONLY)
            code = int(getattr(err, "value", err))
            if code != 0:
                self.failed = f"cudaHostRegister of {size} bytes of the page arena failed with CUDA error {code}"
                log.warning("kvtier: page arena not pinned for GPU copies (they run at pageable-memory speed): %s",
                            self.failed)
                return False
            self.chunks.add(chunk)
        return True

    def unpin_all(self) -> None:
        with self.lock:
            for chunk in sorted(self.chunks):
                self.cudart.cudaHostUnregister(self.base + chunk * self.CHUNK)
            self.chunks.clear()
            self.failed = "the client was closed"


def _pins(client: Client) -> _ArenaPins:
    with client._lock:
        pins = getattr(client, "_kvtier_cuda_pins", None)
        if pins is None:
            pins = _ArenaPins(client)
            client._kvtier_cuda_pins = pins
        return pins


def pin_pages(client: Client, page: np.ndarray) -> bool:
    """Registers with CUDA the chunks of ``client``'s page arena that hold ``page`` (a view of
    the arena from ``get_pages`` or ``lease_pages``), so a copy from it to a GPU is DMA. False
    when it cannot be (see ``pin_page_arena``); the copy then runs at pageable speed."""
    pins = _pins(client)
    if pins.failed is not None:
        return False
    address = page.ctypes.data
    if not (pins.base <= address and address + page.nbytes <= pins.base + pins.length):
        return False  # not a view of the arena (an inline reply's bytes)
    return pins.cover(address, page.nbytes)


def pin_page_arena(client: Client) -> Optional[str]:
    """Whether ``client``'s page arena can be pinned for CUDA copies: None when it can (pages
    are then registered chunk by chunk as ``get_tensors`` first copies them, and unregistered
    when the client closes), else why not: no shared memory, no CUDA, or the driver refused a
    registration. Copies work either way; unpinned ones run at pageable-memory speed."""
    return _pins(client).failed


def get_tensors(client: Client, model: ModelSpec, tokens, max_tokens: int = 0, device=None,
                pin: bool = True, stage: Optional[bool] = None) -> Tuple["_torch.Tensor", "_torch.Tensor"]:
    """The KV of the longest cached prefix of ``tokens`` (at most ``max_tokens``; 0: all) as
    tensors ``[layers, served, kv_heads, head_dim]`` of the model's dtype on ``device`` (default
    CPU); ``served`` may be 0.

    Off the CPU (``stage``, default: whether ``device`` is not the CPU) each page crosses to the
    device in one contiguous copy from the shared arena while the lease holds it, and keys and
    values are laid out there; on the CPU they are copied straight from the arena into place.
    On CUDA (with ``pin``) the arena's chunks holding the pages are registered with the driver
    first (``pin_page_arena``) and the copies are asynchronous DMA; the call returns once they
    are done, before the lease is released. Without shared memory the pages come inline and
    are copied from the reply."""
    device = _torch.device("cpu") if device is None else _torch.device(device)
    cuda = device.type == "cuda"
    stage = device.type != "cpu" if stage is None else stage
    pin_arena = cuda and pin
    shape = model.shape
    per_token = shape.layers * 2 * shape.kv_heads * shape.head_dim
    out = {}
    staged = []

    def begin(served: int) -> None:
        out_shape = (shape.layers, served, shape.kv_heads, shape.head_dim)
        out["keys"] = _torch.empty(out_shape, dtype=_torch.int16, device=device)
        out["values"] = _torch.empty(out_shape, dtype=_torch.int16, device=device)
        out["served"] = served
        if stage:
            out["staging"] = _torch.empty(served * per_token, dtype=_torch.int16, device=device)

    def visit(a: int, page: np.ndarray) -> None:
        t = page.shape[2]
        if stage and not page.flags.c_contiguous:  # a last page served in part: its leading tokens
            page = np.ascontiguousarray(page)
        elif pin_arena:
            pin_pages(client, page)
        with warnings.catch_warnings():  # the arena is read-only; the tensor is only read
            warnings.simplefilter("ignore", UserWarning)
            src = _torch.from_numpy(page.view(np.int16))
        if not stage:
            out["keys"][:, a:a + t] = src[:, 0]
            out["values"][:, a:a + t] = src[:, 1]
            return
        slab = out["staging"][a * per_token:(a + t) * per_token].view(src.shape)
        slab.copy_(src, non_blocking=cuda)
        staged.append((a, t, slab))
        if cuda and a + t >= out["served"]:
            # The lease ends when get_pages returns: the copies must be done by then.
            _torch.cuda.current_stream(device).synchronize()

    client.get_pages(model, _tokens(tokens), visit, max_tokens=max_tokens, begin=begin)
    keys, values = out["keys"], out["values"]
    for a, t, slab in staged:
        keys[:, a:a + t] = slab[:, 0]
        values[:, a:a + t] = slab[:, 1]
    tdtype = torch_dtype(model)
    return keys.view(tdtype), values.view(tdtype)
