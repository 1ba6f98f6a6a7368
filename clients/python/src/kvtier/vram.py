"""The VRAM tier's memory: a pool of page-sized slots in GPU memory that several processes on
one GPU share.

One process creates the pool (``VramPool.create``): one device allocation cut into ``slots``
slots of ``slot_bytes`` each, a page of the model's KV in the layout kvtierd serves
(``[layers, 2, page_tokens, kv_heads, head_dim]``). Its ``handle`` is a small description of
the pool (JSON, no pickle, so it can travel through kvtierd from any tenant without running
code) that another process turns back into the same memory with ``VramPool.attach``: on CUDA
through CUDA IPC (``cudaIpcGetMemHandle`` / ``cudaIpcOpenMemHandle``), so a restore from the
pool is a device-to-device copy; on the CPU through a file in ``/dev/shm`` (mode 0600), which
serves CPU inference and lets the pool's logic run where there is no GPU.

The pool owns no bookkeeping: which page sits in which slot is the directory's business.
``store_page`` and ``restore_pages`` move pages in and out of slots.

CUDA IPC memory is freed when its creator frees it or exits; processes that attached must stop
using it first (``VramPool.close``), as with any CUDA IPC allocation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import base64
import glob
import json
import mmap
import logging
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Tuple

import torch

from .model import ModelSpec

log = logging.getLogger("kvtier")

__all__ = ["PoolHandle", "VramPool", "VramTier", "VramError", "page_bytes", "page_view", "store_page", "restore_pages",
           "same_device"]


class VramError(RuntimeError):
    """A pool could not be created or attached (no CUDA runtime, IPC refused, bad handle)."""


def _page_tokens(model: ModelSpec) -> int:
    return model.page_tokens or 256  # 0: the daemon's default


def page_bytes(model: ModelSpec) -> int:
    """The bytes of one full page of ``model``'s KV (keys and values of every layer)."""
    s = model.shape
    return s.layers * 2 * _page_tokens(model) * s.kv_heads * s.head_dim * 2


@dataclass(frozen=True)
class PoolHandle:
    """What another process needs to map a pool: backend ("cuda" or "host"), the CUDA device's
    UUID (empty on the host), slot count and size, the creating process, and the IPC handle
    (CUDA's 64 bytes) or the shared file's name."""

    backend: str
    device_uuid: str
    slots: int
    slot_bytes: int
    owner_pid: int
    ipc: bytes

    def to_bytes(self) -> bytes:
        d = asdict(self)
        d["ipc"] = base64.b64encode(self.ipc).decode()
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "PoolHandle":
        try:
            d = json.loads(data)
            h = cls(backend=str(d["backend"]), device_uuid=str(d["device_uuid"]), slots=int(d["slots"]),
                    slot_bytes=int(d["slot_bytes"]), owner_pid=int(d["owner_pid"]), ipc=base64.b64decode(d["ipc"]))
        except (ValueError, KeyError, TypeError) as e:
            raise VramError(f"not a VRAM pool handle: {e}") from None
        if h.backend not in ("cuda", "host") or h.slots <= 0 or h.slot_bytes <= 0:
            raise VramError(f"not a VRAM pool handle: {h.backend} pool of {h.slots} x {h.slot_bytes} bytes")
        if h.backend == "cuda" and len(h.ipc) != _IPC_HANDLE_BYTES:
            raise VramError(f"a CUDA IPC handle has {_IPC_HANDLE_BYTES} bytes, not {len(h.ipc)}")
        if h.backend == "host" and not _valid_shm_name(h.ipc.decode(errors="replace")):
            raise VramError("the host pool's file name is not one kvtier makes")
        return h


# --- CUDA runtime through ctypes -----------------------------------------------------------

_IPC_HANDLE_BYTES = 64
_IPC_LAZY_ENABLE_PEER_ACCESS = 1


class _IpcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * _IPC_HANDLE_BYTES)]  # c_ubyte: c_char would stop at a NUL


def _device_uuid(index: int) -> str:
    uuid_ = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return str(uuid_) if uuid_ is not None else f"index:{index}"  # torch without .uuid: the visible index


_cudart_lib = None


def _cudart():
    """The CUDA runtime library torch loaded (found by soname among loaded libraries first,
    then in the nvidia-* wheels beside torch)."""
    global _cudart_lib
    if _cudart_lib is not None:
        return _cudart_lib
    torch.cuda.init()
    names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"]
    candidates = list(names)
    for site in sys.path:
        candidates += sorted(glob.glob(os.path.join(site, "nvidia", "cuda_runtime", "lib", "libcudart.so*")))
    found = ctypes.util.find_library("cudart")
    if found:
        candidates.append(found)
    errors = []
    for name in candidates:
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            errors.append(str(e))
            continue
        for fn, args in (("cudaSetDevice", [ctypes.c_int]),
                         ("cudaMalloc", [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]),
                         ("cudaFree", [ctypes.c_void_p]),
                         ("cudaIpcGetMemHandle", [ctypes.POINTER(_IpcMemHandle), ctypes.c_void_p]),
                         ("cudaIpcOpenMemHandle", [ctypes.POINTER(ctypes.c_void_p), _IpcMemHandle, ctypes.c_uint]),
                         ("cudaIpcCloseMemHandle", [ctypes.c_void_p])):
            f = getattr(lib, fn)
            f.argtypes = args
            f.restype = ctypes.c_int
        lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        _cudart_lib = lib
        return lib
    raise VramError("no CUDA runtime library (libcudart) could be loaded: " + "; ".join(errors[-3:]))


def _check(lib, code: int, what: str) -> None:
    if code != 0:
        raise VramError(f"{what} failed: CUDA error {code} ({lib.cudaGetErrorString(code).decode()})")


class _CudaMemory:
    """Device memory torch can wrap without copying (``__cuda_array_interface__``)."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None}


# --- host backend ---------------------------------------------------------------------------

_SHM_PREFIX = "kvtier-vram-"


def _valid_shm_name(name: str) -> bool:
    rest = name[len(_SHM_PREFIX):]
    return name.startswith(_SHM_PREFIX) and len(rest) == 32 and all(c in "0123456789abcdef" for c in rest)


class VramPool:
    """Slots of GPU (or shared host) memory; see the module's documentation."""

    def __init__(self, handle: PoolHandle, memory: torch.Tensor, device: torch.device, release):
        self.handle = handle
        self.device = device
        self.memory = memory.view(handle.slots, handle.slot_bytes)   # uint8 [slots, slot_bytes]
        self._release = release

    @property
    def slots(self) -> int:
        return self.handle.slots

    @property
    def slot_bytes(self) -> int:
        return self.handle.slot_bytes

    @classmethod
    def create(cls, device, slots: int, slot_bytes: int) -> "VramPool":
        """A new pool of ``slots`` slots of ``slot_bytes`` on ``device`` ("cuda", "cuda:1", "cpu")."""
        if slots <= 0 or slot_bytes <= 0:
            raise VramError(f"a pool needs slots and bytes, not {slots} x {slot_bytes}")
        device = torch.device(device)
        nbytes = slots * slot_bytes
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            device = torch.device("cuda", index)
            lib = _cudart()
            _check(lib, lib.cudaSetDevice(index), "cudaSetDevice")
            ptr = ctypes.c_void_p()
            _check(lib, lib.cudaMalloc(ctypes.byref(ptr), nbytes), f"cudaMalloc of {nbytes} bytes")
            handle = _IpcMemHandle()
            code = lib.cudaIpcGetMemHandle(ctypes.byref(handle), ptr)
            if code != 0:
                lib.cudaFree(ptr)
                _check(lib, code, "cudaIpcGetMemHandle")
            memory = torch.as_tensor(_CudaMemory(ptr.value, nbytes), device=device)
            h = PoolHandle("cuda", _device_uuid(index), slots, slot_bytes, os.getpid(), bytes(handle.reserved))

            def release(ptr=ptr.value, lib=lib, index=index):
                torch.cuda.synchronize(index)
                lib.cudaFree(ctypes.c_void_p(ptr))
            return cls(h, memory, device, release)
        if device.type != "cpu":
            raise VramError(f"a pool lives on a CUDA device or the CPU, not {device}")
        name = _SHM_PREFIX + uuid.uuid4().hex
        path = os.path.join("/dev/shm", name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            mm = mmap.mmap(fd, nbytes)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        h = PoolHandle("host", "", slots, slot_bytes, os.getpid(), name.encode())
        memory = torch.frombuffer(mm, dtype=torch.uint8)

        def release(path=path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return cls(h, memory, device, release)

    @classmethod
    def attach(cls, handle, device=None) -> "VramPool":
        """The pool ``handle`` (a ``PoolHandle`` or its bytes) describes, mapped into this process.
        On CUDA ``device`` (default: the device with the handle's UUID) must be that GPU."""
        h = handle if isinstance(handle, PoolHandle) else PoolHandle.from_bytes(handle)
        nbytes = h.slots * h.slot_bytes
        if h.backend == "cuda":
            if not torch.cuda.is_available():
                raise VramError("the pool is in GPU memory and CUDA is not available here")
            index = None
            for i in range(torch.cuda.device_count()):
                if _device_uuid(i) == h.device_uuid:
                    index = i
            if index is None:
                raise VramError(f"no visible GPU has the pool's UUID {h.device_uuid}")
            if device is not None and torch.device(device).index not in (None, index):
                raise VramError(f"the pool is on cuda:{index}, not {device}")
            lib = _cudart()
            _check(lib, lib.cudaSetDevice(index), "cudaSetDevice")
            raw = _IpcMemHandle()
            ctypes.memmove(ctypes.addressof(raw), h.ipc, _IPC_HANDLE_BYTES)
            ptr = ctypes.c_void_p()
            _check(lib, lib.cudaIpcOpenMemHandle(ctypes.byref(ptr), raw, _IPC_LAZY_ENABLE_PEER_ACCESS),
                   "cudaIpcOpenMemHandle (a pool cannot be attached in the process that created it)")
            dev = torch.device("cuda", index)
            memory = torch.as_tensor(_CudaMemory(ptr.value, nbytes), device=dev)

            def release(ptr=ptr.value, lib=lib, index=index):
                torch.cuda.synchronize(index)
                lib.cudaIpcCloseMemHandle(ctypes.c_void_p(ptr))
            return cls(h, memory, dev, release)
        name = h.ipc.decode()
        fd = os.open(os.path.join("/dev/shm", name), os.O_RDWR)
        try:
            if os.fstat(fd).st_size != nbytes:
                raise VramError(f"the pool's file has {os.fstat(fd).st_size} bytes, not {nbytes}")
            mm = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        return cls(h, torch.frombuffer(mm, dtype=torch.uint8), torch.device("cpu"), lambda: None)

    def slot(self, index: int) -> torch.Tensor:
        """Slot ``index``'s bytes (uint8 ``[slot_bytes]``, a view of the pool)."""
        if not 0 <= index < self.handle.slots:
            raise IndexError(f"slot {index} of a {self.handle.slots}-slot pool")
        return self.memory[index]

    def close(self) -> None:
        """Unmaps the pool (the creator frees it; attached processes must close first)."""
        release, self._release = self._release, None
        if release is not None:
            self.memory = None
            release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def same_device(a, b) -> bool:
    """Whether torch devices ``a`` and ``b`` are the same device ("cuda" is the current one)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def page_view(pool: VramPool, slot: int, model: ModelSpec, tokens: int) -> torch.Tensor:
    """The first ``tokens`` tokens of the page in ``slot``: an int16 view ``[layers, 2, tokens,
    kv_heads, head_dim]`` of the pool (strided when ``tokens`` is short of a page)."""
    return _page_view(pool, slot, model, _page_tokens(model))[:, :, :tokens]


def _page_view(pool: VramPool, slot: int, model: ModelSpec, tokens: int) -> torch.Tensor:
    s = model.shape
    n = s.layers * 2 * tokens * s.kv_heads * s.head_dim
    if n * 2 > pool.slot_bytes:
        raise VramError(f"a page of {tokens} tokens needs {n * 2} bytes; the pool's slots have {pool.slot_bytes}")
    return pool.slot(slot)[:n * 2].view(torch.int16).view(s.layers, 2, tokens, s.kv_heads, s.head_dim)


def store_page(pool: VramPool, slot: int, model: ModelSpec, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Writes one page's keys and values (``[layers, t, kv_heads, head_dim]``, ``t`` at most
    the page's tokens, the model's dtype, any device) into ``slot``. Asynchronous on CUDA."""
    t = keys.shape[1]
    if keys.shape != values.shape or t > _page_tokens(model):
        raise VramError(f"a page holds at most {_page_tokens(model)} tokens of equal keys and values, "
                        f"not {tuple(keys.shape)} and {tuple(values.shape)}")
    dst = _page_view(pool, slot, model, _page_tokens(model))
    dst[:, 0, :t].copy_(keys.view(torch.int16), non_blocking=True)
    dst[:, 1, :t].copy_(values.view(torch.int16), non_blocking=True)


def restore_pages(pool: VramPool, slots: Sequence[int], model: ModelSpec, tokens: int, device=None,
                  out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[layers, tokens, kv_heads, head_dim]`` (the model's dtype, on ``device``,
    default the pool's) from the pages in ``slots``, in order; the last may be partial. One
    strided device-to-device copy per page and half. ``out`` reuses two tensors of that shape."""
    from .torch import torch_dtype
    device = pool.device if device is None else torch.device(device)
    s = model.shape
    P = _page_tokens(model)
    if len(slots) != -(-tokens // P):
        raise VramError(f"{tokens} tokens take {-(-tokens // P)} pages, not {len(slots)}")
    if out is None:
        shape = (s.layers, tokens, s.kv_heads, s.head_dim)
        keys = torch.empty(shape, dtype=torch.int16, device=device)
        values = torch.empty(shape, dtype=torch.int16, device=device)
    else:
        keys, values = (t.view(torch.int16) for t in out)
    for i, slot in enumerate(slots):
        a = i * P
        t = min(P, tokens - a)
        src = _page_view(pool, slot, model, P)
        keys[:, a:a + t].copy_(src[:, 0, :t], non_blocking=True)
        values[:, a:a + t].copy_(src[:, 1, :t], non_blocking=True)
    dtype = torch_dtype(model)
    return keys.view(dtype), values.view(dtype)


class VramTier:
    """One process's side of the VRAM tier: its own pool, registered with kvtierd (optional), and
    the pools of other processes of the tenant that it has attached to restore from.

        tier = VramTier(client)
        tier.create_pool("cuda", slots=64, model=spec)          # this process lends GPU memory
        tier.place(spec, tokens, keys, values)                    # after a prefill or a restore
        kv = tier.restore(spec, tokens)                           # any process of the tenant
        if kv is None: ...                                        # not resident: RAM or disk

    kvtierd keeps the directory (which page is in which slot, leases, eviction by heat;
    docs/protocol.md, ``VRAM_*``), so a process restores from another's pool without knowing
    it: ``restore`` leases the slots, copies device to device, and releases them. The pool is
    freed when ``close`` (or the client's connection) ends it; a process that attached other
    pools closes its attachments in ``close``.
    """

    MAX_ATTACHED = 8

    def __init__(self, client):
        self.client = client
        self.pool: Optional[VramPool] = None
        self.pool_id: Optional[int] = None
        self._attached = {}   # pool id -> VramPool, oldest first
        self._owner = None    # the connection that registered self.pool
        self.stats = {"placedPages": 0, "restores": 0, "restoredTokens": 0, "misses": 0}

    def _resolved(self, model: ModelSpec) -> ModelSpec:
        """``model`` with the page size kvtierd registered it with (``page_tokens`` 0 takes the
        daemon's ``pageTokens``, which need not be 256): slot layouts must match the daemon's pages."""
        import dataclasses
        _, reg = self.client._spec(model)
        return model if model.page_tokens == reg.page_tokens else dataclasses.replace(model, page_tokens=reg.page_tokens)

    def create_pool(self, device, slots: int, model: Optional[ModelSpec] = None, slot_bytes: int = 0) -> VramPool:
        """Allocates this process's pool (``slots`` slots of ``slot_bytes``, default one page of
        ``model``) and registers it with kvtierd."""
        if self.pool is not None:
            raise VramError("this VramTier has a pool already")
        slot_bytes = slot_bytes or page_bytes(self._resolved(model))
        pool = VramPool.create(device, slots, slot_bytes)
        # The pool lives as long as the connection that registered it: a connection of its own,
        # so that ``close`` ends the pool in kvtierd before its memory is freed.
        from .client import Client
        owner = None
        try:
            owner = Client(self.client.socket_path, shared_memory=False,
                           client_name=f"kvtier vram pool pid {os.getpid()}")
            self.pool_id = owner.vram_register_pool(pool.handle.device_uuid or "host", slots, slot_bytes,
                                                    pool.handle.to_bytes())
        except BaseException:
            if owner is not None:
                owner.close()
            pool.close()
            raise
        self._owner = owner
        self.pool = pool
        return pool

    def place_from(self, model: ModelSpec, tokens, fill) -> int:
        """Places the cached pages of ``tokens`` that this process's pool lacks, written by
        ``fill(a, b, page)``: tokens ``a..<b`` into ``page``, an int16 view of the slot
        ``[layers, 2, b - a, kv_heads, head_dim]`` on the pool's device. Only pages kvtierd holds
        can be placed (put them first). Returns the leading tokens resident afterwards."""
        if self.pool is None:
            raise VramError("no pool: create_pool first")
        placement = self.client.vram_place(model, self.pool_id, tokens)
        if placement.lease_id == 0:
            return placement.resident_tokens
        model = self._resolved(model)
        P = _page_tokens(model)
        try:
            for index, t, slot in placement.pages:
                fill(index * P, index * P + t, page_view(self.pool, slot, model, t))
            if self.pool.device.type == "cuda":
                torch.cuda.synchronize(self.pool.device)
        except BaseException:
            self.client._release_quietly(placement.lease_id)
            raise
        self.client.vram_commit(placement.lease_id)
        self.stats["placedPages"] += len(placement.pages)
        last = placement.pages[-1]
        return last[0] * P + last[1]

    def place(self, model: ModelSpec, tokens, keys: torch.Tensor, values: torch.Tensor) -> int:
        """``place_from`` with the pages cut from ``keys`` and ``values`` (``[layers, ≥ cached
        tokens, kv_heads, head_dim]`` of the model's dtype, on the pool's device or anywhere torch
        copies from)."""
        def fill(a: int, b: int, page: torch.Tensor) -> None:
            if b > keys.shape[1]:
                raise VramError(f"the page of tokens {a}..<{b} is cached; the tensors hold {keys.shape[1]} tokens")
            page[:, 0].copy_(keys[:, a:b].view(torch.int16), non_blocking=True)
            page[:, 1].copy_(values[:, a:b].view(torch.int16), non_blocking=True)
        return self.place_from(model, tokens, fill)

    def _pool_for(self, lease) -> VramPool:
        if lease.pool_id == self.pool_id:
            return self.pool
        pool = self._attached.pop(lease.pool_id, None)
        if pool is None:
            pool = VramPool.attach(lease.handle)
            if (pool.slots, pool.slot_bytes) != (lease.slots, lease.slot_bytes):
                pool.close()
                raise VramError(f"pool {lease.pool_id}'s handle describes {pool.slots} x {pool.slot_bytes} bytes; "
                                f"kvtierd says {lease.slots} x {lease.slot_bytes}")
            while len(self._attached) >= self.MAX_ATTACHED:
                self._attached.pop(next(iter(self._attached))).close()
        self._attached[lease.pool_id] = pool  # most recent last
        return pool

    def restore_into(self, model: ModelSpec, tokens, visit, max_tokens: int = 0, min_tokens: int = 1,
                     begin=None) -> int:
        """Hands the pages of the longest prefix of ``tokens`` (at most ``max_tokens``; 0: all)
        resident in a VRAM pool of this tenant to ``visit(a, page)``, page by page: ``page`` an
        int16 view ``[layers, 2, t, kv_heads, head_dim]`` of the slot (on the pool's device)
        holding tokens ``a..<a + t``, valid only during the call. ``begin(served, device)``, when
        given, comes first. Returns the tokens served: 0 (and no call) when fewer than
        ``min_tokens`` are resident."""
        lease = self.client.vram_lease(model, tokens)
        model = self._resolved(model)
        served = min(lease.tokens, max_tokens) if max_tokens else lease.tokens
        if served < max(1, min_tokens):
            if lease.lease_id:
                self.client._release_quietly(lease.lease_id)
            self.stats["misses"] += 1
            return 0
        P = _page_tokens(model)
        pool = None
        try:
            pool = self._pool_for(lease)
            if begin is not None:
                begin(served, pool.device)
            for i, (_, slot) in enumerate(lease.pages[:-(-served // P)]):
                a = i * P
                visit(a, page_view(pool, slot, model, min(P, served - a)))
        finally:
            if pool is not None and pool.device.type == "cuda":
                torch.cuda.synchronize(pool.device)   # the lease ends below: every queued copy must be done
            self.client._release_quietly(lease.lease_id)
        self.stats["restores"] += 1
        self.stats["restoredTokens"] += served
        return served

    def restore(self, model: ModelSpec, tokens, device=None, max_tokens: int = 0, min_tokens: int = 1):
        """Keys and values ``[layers, served, kv_heads, head_dim]`` of the longest prefix of
        ``tokens`` (at most ``max_tokens``; 0: all) resident in a VRAM pool of this tenant, copied
        device to device (on ``device``, default the pool's), or None when fewer than
        ``min_tokens`` are resident."""
        from .torch import torch_dtype
        s = model.shape
        out = {}

        def begin(served: int, pool_device) -> None:
            shape = (s.layers, served, s.kv_heads, s.head_dim)
            at = pool_device if device is None else torch.device(device)
            out["keys"] = torch.empty(shape, dtype=torch.int16, device=at)
            out["values"] = torch.empty(shape, dtype=torch.int16, device=at)

        def visit(a: int, page: torch.Tensor) -> None:
            t = page.shape[2]
            out["keys"][:, a:a + t].copy_(page[:, 0], non_blocking=True)
            out["values"][:, a:a + t].copy_(page[:, 1], non_blocking=True)

        if not self.restore_into(model, tokens, visit, max_tokens=max_tokens, min_tokens=min_tokens, begin=begin):
            return None
        dtype = torch_dtype(model)
        return out["keys"].view(dtype), out["values"].view(dtype)

    DROP_DEADLINE = 10.0

    def close(self) -> None:
        """Closes attachments to other pools, and this process's pool: first it leaves kvtierd's
        directory (``VRAM_DROP``), then, once no other process is copying from it (their leases
        are released, which takes milliseconds), its memory is freed."""
        for pool in self._attached.values():
            pool.close()
        self._attached.clear()
        if self.pool is None:
            return
        from .errors import KVTierConnectionError, KVTierError
        deadline = time.monotonic() + self.DROP_DEADLINE
        pause = 0.0005
        try:
            while self._owner.vram_drop(self.pool_id):
                if time.monotonic() >= deadline:
                    log.warning("kvtier: VRAM pool %d still had readers after %.0f s; freeing it anyway",
                                self.pool_id, self.DROP_DEADLINE)
                    break
                time.sleep(pause)           # readers are mid-copy: their RELEASE comes within milliseconds
                pause = min(pause * 2, 0.05)
        except (KVTierConnectionError, KVTierError) as e:
            log.warning("kvtier: VRAM_DROP of pool %d failed (%s); freeing it", self.pool_id, e)
        self._owner.close()
        self._owner = None
        self.pool.close()
        self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
