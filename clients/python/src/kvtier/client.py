"""The kvtierd client: one Unix-socket connection, bulk bytes through the tenant's shared arena."""

from __future__ import annotations

import array
import mmap
import os
import socket
import struct
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _wire
from ._arena import arena_problem
from ._wire import Extent, Op, SessionInfo
from .errors import CLOSING_CODES, KVTierConnectionError, KVTierError, ProtocolViolation
from .model import ModelSpec
from .paths import default_socket_path

ModelRef = Union[ModelSpec, int]

# Staging bytes per shared-memory PUT: bigger puts go as several PUTs, each at most this much
# staging memory between ALLOC and PUT (and at most maxExtents pages, and a quarter of the
# tenant's staging arena, which the tenant's connections share).
SHM_BATCH_BYTES = 512 << 20
# From this many bytes a put's batch is filled by several threads (`put_pages(concurrent_fill=)`).
PARALLEL_FILL_BYTES = 4 << 20
_FILL_POOL = None
_FILL_POOL_LOCK = threading.Lock()


def _forget_fill_pool() -> None:
    """In a forked child: the parent's pool threads do not exist there; start afresh."""
    global _FILL_POOL, _FILL_POOL_LOCK
    _FILL_POOL = None
    _FILL_POOL_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_fill_pool)


def _fill_pool():
    """Threads that fill large put batches, shared by every client of the process."""
    global _FILL_POOL
    with _FILL_POOL_LOCK:
        if _FILL_POOL is None:
            from concurrent.futures import ThreadPoolExecutor
            _FILL_POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                            thread_name_prefix="kvtier-fill")
        return _FILL_POOL

@dataclass(frozen=True)
class LookupResult:
    """How much of a token sequence is cached, and where."""

    cached_tokens: int
    ram_tokens: int
    disk_tokens: int
    estimated_load_micros: int
    #: Leading tokens whose pages are all resident in one of the tenant's VRAM pools
    #: (``kvtier.vram``); independent of the RAM/disk split.
    vram_tokens: int = 0


@dataclass(frozen=True)
class VramPlacement:
    """Slots a ``vram_place`` reserved: ``pages`` are ``(page index, tokens, slot)``; the leading
    ``resident_tokens`` were in the pool already. ``lease_id`` 0: nothing reserved."""

    lease_id: int
    resident_tokens: int
    pages: List[Tuple[int, int, int]]


@dataclass(frozen=True)
class VramLease:
    """A ``vram_lease`` answer: the pool (id, device, slot count and size, the handle to map it)
    and the resident leading pages, ``(tokens, slot)`` in page order, ``tokens`` in all."""

    pool_id: int
    device_uuid: str
    slots: int
    slot_bytes: int
    handle: bytes
    lease_id: int
    tokens: int
    pages: List[Tuple[int, int]]


@dataclass(frozen=True)
class PutResult:
    """What a ``put_detail`` did: tokens cached after it, pages it added, tokens it sent."""

    cached_tokens: int
    new_pages: int
    sent_tokens: int
    requests: int


@dataclass(frozen=True)
class _Registered:
    model_id: int
    page_tokens: int


def _chunks(start: int, end: int, page: int) -> List[Tuple[int, int]]:
    """Token ranges of PUT data chunks: to the end of `start`'s page, whole pages, the rest."""
    out = []
    a = start
    while a < end:
        b = min((a // page + 1) * page, end)
        out.append((a, b))
        a = b
    return out


class Client:
    """A connection to kvtierd.

    ``Client(socket_path=None, *, shared_memory=True, timeout=60.0, client_name=None)``:
    connects to ``socket_path`` (default: the daemon's default, see ``default_socket_path``),
    says HELLO and, with ``shared_memory``, maps the tenant's arena so page bytes never cross
    the socket. Without an arena (refused, or ``shared_memory=False``) data travels inline.
    ``timeout`` bounds every socket wait in seconds (None: wait forever).

    A Client may be shared by threads (calls are serialized) but not across ``fork``.
    """

    def __init__(self, socket_path: Optional[str] = None, *, shared_memory: bool = True,
                 timeout: Optional[float] = 60.0, client_name: Optional[str] = None):
        self.socket_path = socket_path or default_socket_path()
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._next_id = 0
        self._broken: Optional[str] = None
        # The page arena (read-only: GET extents) and the staging arena (read-write: ALLOC).
        self._mm: Optional[mmap.mmap] = None
        self._staging: Optional[mmap.mmap] = None
        #: Why page bytes travel inline although shared memory was asked for (None otherwise).
        self.shared_memory_unavailable_reason: Optional[str] = None
        self._models: Dict[ModelSpec, _Registered] = {}
        self._by_id: Dict[int, Tuple[ModelSpec, _Registered]] = {}
        self.max_control_body = _wire.MAX_CONTROL_BODY
        self.max_inline_body = _wire.MAX_INLINE_BODY
        self.max_tokens_per_request = _wire.MAX_TOKENS_PER_REQUEST
        self.arena_bytes = 0
        self.staging_bytes = 0
        self.tenant: Optional[int] = None
        # Called (once each) before the page arena is unmapped: kvtier.torch unpins it there.
        self._before_unmap: List[Callable[[], None]] = []
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as e:
            sock.close()
            raise KVTierConnectionError(f"cannot connect to kvtierd at {self.socket_path}: {e.strerror or e}; "
                                        "is the daemon running (kvtierd --socket PATH)?") from e
        self._sock: Optional[socket.socket] = sock
        try:
            self._hello(shared_memory, client_name or f"kvtier-python pid {os.getpid()} {os.path.basename(sys.argv[0] or 'python')}")
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def close(self) -> None:
        """Closes the connection (the daemon releases its leases) and unmaps the arena."""
        with self._lock:
            sock, self._sock = getattr(self, "_sock", None), None
            if sock is not None:
                sock.close()
            hooks, self._before_unmap = getattr(self, "_before_unmap", []), []
            for hook in hooks:
                try:
                    hook()
                except Exception:
                    pass  # unpinning is best effort; the mapping goes either way
            for name in ("_mm", "_staging"):
                mm = getattr(self, name, None)
                setattr(self, name, None)
                if mm is not None:
                    try:
                        mm.close()
                    except BufferError:
                        pass  # an array still views the arena; it is unmapped when the last one goes
            if getattr(self, "_broken", None) is None:
                self._broken = "the client was closed"

    @property
    def closed(self) -> bool:
        return self._sock is None

    def page_arena_address(self) -> Optional[Tuple[int, int]]:
        """``(address, bytes)`` of this process's read-only mapping of the page arena, or None
        without shared memory. For registering it with a device driver (``kvtier.torch`` pins
        it for CUDA copies); ``on_unmap`` undoes such a registration before the mapping goes."""
        with self._lock:
            if self._mm is None:
                return None
            return int(np.frombuffer(self._mm, dtype=np.uint8, count=1).ctypes.data), self.arena_bytes

    def on_unmap(self, hook: Callable[[], None]) -> None:
        """Calls ``hook()`` once, when ``close`` is about to unmap the page arena."""
        with self._lock:
            self._before_unmap.append(hook)

    @property
    def shared_memory(self) -> bool:
        """Whether page bytes travel through the mapped arena (else inline on the socket)."""
        return self._mm is not None and self._staging is not None

    # ------------------------------------------------------------ transport

    def _fail(self, why: str) -> KVTierConnectionError:
        self._broken = why
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        return KVTierConnectionError(why)

    def _check_usable(self) -> socket.socket:
        if os.getpid() != self._pid:
            raise KVTierConnectionError(f"this Client was opened in process {self._pid}; open a new one after fork")
        if self._sock is None:
            raise KVTierConnectionError(f"not connected to kvtierd at {self.socket_path}: {self._broken}")
        return self._sock

    def _send(self, sock: socket.socket, parts: Sequence) -> None:
        if len(parts) > 1 and sum(len(p) for p in parts[1:]) <= 65536:
            parts = [b"".join(parts)]  # one send for small frames
        try:
            for part in parts:
                sock.sendall(part)
        except socket.timeout:
            raise self._fail(f"kvtierd at {self.socket_path} stopped reading (send timed out)") from None
        except OSError as e:
            raise self._fail(f"lost the connection to kvtierd at {self.socket_path} while sending: {e.strerror or e}") from None

    def _recv_into(self, sock: socket.socket, view: memoryview, what: str) -> None:
        got = 0
        while got < len(view):
            try:
                n = sock.recv_into(view[got:])
            except socket.timeout:
                raise self._fail(f"kvtierd at {self.socket_path} did not answer in time ({what})") from None
            except OSError as e:
                raise self._fail(f"lost the connection to kvtierd at {self.socket_path}: {e.strerror or e}") from None
            if n == 0:
                raise self._fail(f"kvtierd at {self.socket_path} closed the connection ({what}, {got} of {len(view)} bytes read)")
            got += n

    def _recv_header(self, sock: socket.socket, want_fds: bool) -> Tuple[bytes, List[int]]:
        if not want_fds:
            buf = bytearray(_wire.HEADER_BYTES)
            self._recv_into(sock, memoryview(buf), "reply header")
            return bytes(buf), []
        fds: List[int] = []
        try:
            flags = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
            data, ancdata, msg_flags, _ = sock.recvmsg(_wire.HEADER_BYTES, socket.CMSG_SPACE(4 * array.array("i").itemsize), flags)
        except socket.timeout:
            raise self._fail(f"kvtierd at {self.socket_path} did not answer HELLO in time") from None
        except OSError as e:
            raise self._fail(f"lost the connection to kvtierd at {self.socket_path}: {e.strerror or e}") from None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[:len(payload) - len(payload) % 4]))
        if not data:
            for fd in fds:
                os.close(fd)
            raise self._fail(f"kvtierd at {self.socket_path} closed the connection before answering HELLO")
        if len(data) < _wire.HEADER_BYTES:
            rest = bytearray(_wire.HEADER_BYTES - len(data))
            try:
                self._recv_into(sock, memoryview(rest), "reply header")
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            data = bytes(data) + bytes(rest)
        return data, fds

    def _call(self, opcode: int, body_parts: Sequence = (b"",), *, want_fds: bool = False) -> Tuple[bytearray, List[int]]:
        """Sends one request, returns the reply body (and descriptors, for HELLO). Raises
        KVTierError for an error reply, KVTierConnectionError/ProtocolViolation when the
        connection can no longer be used."""
        with self._lock:
            sock = self._check_usable()
            body_len = sum(len(p) for p in body_parts)
            limit = self.max_inline_body if opcode in _wire.INLINE_REQUESTS else self.max_control_body
            if body_len > limit:
                raise KVTierError("tooLarge", f"request body of {body_len} bytes is over the daemon's limit of {limit}")
            self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
            rid = self._next_id
            self._send(sock, [_wire.HEADER.pack(body_len, opcode, 0, rid, 0), *body_parts])
            head, fds = self._recv_header(sock, want_fds)
            try:
                length, op, flags, reply_id, status = _wire.HEADER.unpack(head)
                problem = None
                if not flags & _wire.FLAG_REPLY:
                    problem = "a frame without the reply flag"
                elif flags & ~(_wire.FLAG_REPLY | _wire.FLAG_FDS):
                    problem = f"unknown reply flags 0x{flags:04x}"
                elif reply_id != rid and not (status and reply_id == 0):
                    problem = f"a reply to request {reply_id} while request {rid} was outstanding"
                elif op != opcode and not status:
                    problem = f"a reply with opcode 0x{op:04x} to a request with 0x{opcode:04x}"
                elif bool(flags & _wire.FLAG_FDS) != bool(fds) and (fds or not want_fds):
                    problem = "descriptors that do not match the reply's flags"
                reply_limit = self.max_inline_body if opcode in _wire.INLINE_REPLIES and not status else self.max_control_body
                if problem is None and length > reply_limit:
                    problem = f"a {length}-byte reply body, over the limit of {reply_limit}"
                if problem is not None:
                    raise ProtocolViolation(f"kvtierd sent {problem}; closing the connection")
                body = bytearray(length)
                if length:
                    self._recv_into(sock, memoryview(body), "reply body")
            except ProtocolViolation as e:
                for fd in fds:
                    os.close(fd)
                self._fail(e.message)
                raise
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            if status:
                for fd in fds:
                    os.close(fd)
                err = KVTierError.from_status(status, _wire.error_message(body), opcode)
                if err.code in CLOSING_CODES or reply_id == 0:
                    self._fail(f"kvtierd closed the connection after an error: {err}")
                raise err
            return body, fds

    def _hello(self, shared_memory: bool, client_name: str) -> None:
        body, fds = self._call(Op.HELLO, [_wire.hello_request(shared_memory, client_name)], want_fds=True)
        try:
            reply = _wire.hello_reply(body)
        except ProtocolViolation as e:
            for fd in fds:
                os.close(fd)
            raise self._fail(e.message) from None
        self.tenant = reply.tenant
        # Trust the daemon's limits, but never beyond what version 1 allows.
        self.max_control_body = min(reply.max_control_body, _wire.MAX_CONTROL_BODY) or _wire.MAX_CONTROL_BODY
        self.max_inline_body = min(reply.max_inline_body, _wire.MAX_INLINE_BODY) or _wire.MAX_INLINE_BODY
        self.max_tokens_per_request = min(reply.max_tokens_per_request, _wire.MAX_TOKENS_PER_REQUEST) or _wire.MAX_TOKENS_PER_REQUEST
        try:
            if shared_memory:
                self.shared_memory_unavailable_reason = self._map_arenas(reply, fds)
                if self.shared_memory_unavailable_reason is not None and fds:
                    warnings.warn(f"kvtier: page bytes go inline: {self.shared_memory_unavailable_reason}", RuntimeWarning, stacklevel=3)
        finally:
            for fd in fds:
                os.close(fd)  # mmap keeps its own duplicate

    def _map_arenas(self, reply, fds: List[int]) -> Optional[str]:
        """Maps the page arena read-only and the staging arena read-write, each after checking
        its seals; returns why not (the connection then goes on inline)."""
        if not reply.capabilities & _wire.CAP_SHARED_MEMORY:
            return "kvtierd offers no shared memory"
        if len(fds) != 2:
            return f"the HELLO reply carried {len(fds)} descriptors, not two (page arena, staging arena)"
        if not (0 < reply.arena_bytes <= sys.maxsize and 0 < reply.staging_bytes <= sys.maxsize):
            return f"the arenas are {reply.arena_bytes} and {reply.staging_bytes} bytes"
        problem = (arena_problem(fds[0], reply.arena_bytes, True, "page arena")
                   or arena_problem(fds[1], reply.staging_bytes, False, "staging arena"))
        if problem is not None:
            return problem
        try:
            pages = mmap.mmap(fds[0], reply.arena_bytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except (OSError, ValueError, OverflowError) as e:
            return f"cannot map the page arena read-only: {e}"
        try:
            staging = mmap.mmap(fds[1], reply.staging_bytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as e:
            pages.close()
            return f"cannot map the staging arena: {e}"
        self._mm, self._staging = pages, staging
        self.arena_bytes, self.staging_bytes = reply.arena_bytes, reply.staging_bytes
        return None

    # ------------------------------------------------------------ models

    def register(self, model: ModelSpec) -> int:
        """Registers ``model`` (idempotent; cached per client) and returns its model id."""
        return self._registered(model).model_id

    def _registered(self, model: ModelSpec) -> _Registered:
        if not isinstance(model, ModelSpec):
            raise TypeError(f"expected a kvtier.ModelSpec, got {type(model).__name__}")
        found = self._models.get(model)
        if found is not None:
            return found
        body, _ = self._call(Op.REGISTER_MODEL, [model.register_body()])
        r = _wire.Reader(body, "REGISTER_MODEL reply")
        mid, page_tokens = r.u64(), r.u16()
        r.finish()
        if page_tokens == 0 or (model.page_tokens and page_tokens != model.page_tokens):
            raise self._protocol(f"REGISTER_MODEL reply: page tokens {page_tokens} for a request of {model.page_tokens}")
        reg = _Registered(mid, page_tokens)
        self._models[model] = reg
        self._by_id[mid] = (model, reg)
        return reg

    def _model_id(self, model: ModelRef) -> int:
        if isinstance(model, ModelSpec):
            return self._registered(model).model_id
        if isinstance(model, (int, np.integer)) and not isinstance(model, bool) and 0 <= model <= 0xFFFFFFFFFFFFFFFF:
            return int(model)
        raise TypeError("model must be a kvtier.ModelSpec or a model id (int)")

    def _spec(self, model: ModelRef) -> Tuple[ModelSpec, _Registered]:
        if isinstance(model, ModelSpec):
            return model, self._registered(model)
        mid = self._model_id(model)
        if mid not in self._by_id:
            raise ValueError(f"model 0x{mid:x} was not registered by this client: pass its kvtier.ModelSpec")
        return self._by_id[mid]

    def _protocol(self, why: str) -> ProtocolViolation:
        self._fail(why)
        return ProtocolViolation(why)

    # ------------------------------------------------------------ lookup

    def _tokens(self, tokens, *, truncate: bool) -> np.ndarray:
        arr = _wire.token_array(tokens)
        if len(arr) > self.max_tokens_per_request:
            if not truncate:
                raise ValueError(f"{len(arr)} tokens in one request; kvtierd takes at most {self.max_tokens_per_request}")
            # A cached prefix is never longer than one put can make it: looking at the first
            # maxTokensPerRequest tokens gives the same answer.
            arr = arr[: self.max_tokens_per_request]
        return arr

    def lookup_detail(self, model: ModelRef, tokens) -> LookupResult:
        """The longest cached prefix of ``tokens``, split over RAM and disk, with a load estimate."""
        mid = self._model_id(model)
        toks = self._tokens(tokens, truncate=True)
        body, _ = self._call(Op.LOOKUP, [_wire.u64(mid), _wire.tokens_field(toks)])
        r = _wire.Reader(body, "LOOKUP reply")
        out = LookupResult(r.u32(), r.u32(), r.u32(), r.u64(), r.u32())
        r.finish()
        if (out.cached_tokens > len(toks) or out.ram_tokens + out.disk_tokens != out.cached_tokens
                or out.vram_tokens > out.cached_tokens):
            raise self._protocol(f"LOOKUP reply: {out} for {len(toks)} tokens")
        return out

    def lookup(self, model: ModelRef, tokens) -> int:
        """How many leading tokens of ``tokens`` have cached KV."""
        return self.lookup_detail(model, tokens).cached_tokens

    # ------------------------------------------------------------ alloc / release

    def alloc(self, sizes: Sequence[int]) -> Tuple[int, List[Extent]]:
        """Low level: staging extents in the staging arena (``ALLOC``); returns ``(lease_id, extents)``.
        ``put`` does this itself."""
        if not self.shared_memory:
            raise KVTierError("invalidArgument", "this connection has no shared memory; ALLOC needs an arena")
        sizes = [int(s) for s in sizes]
        if not 0 < len(sizes) <= _wire.MAX_EXTENTS or min(sizes) <= 0:
            raise ValueError(f"ALLOC takes 1...{_wire.MAX_EXTENTS} positive sizes")
        body, _ = self._call(Op.ALLOC, [_wire.u32(len(sizes)), struct.pack(f"<{len(sizes)}Q", *sizes)])
        r = _wire.Reader(body, "ALLOC reply")
        lease = r.u64()
        extents = r.extents()
        r.finish()
        if len(extents) != len(sizes):
            raise self._protocol(f"ALLOC reply: {len(extents)} extents for {len(sizes)} sizes")
        for e, want in zip(extents, sizes):
            self._check_extent(e, want, "ALLOC reply", self.staging_bytes)
        return lease, extents

    def _check_extent(self, e: Extent, need: int, context: str, arena_bytes: int) -> None:
        if (e.offset % _wire.ARENA_ALIGNMENT or e.bytes < need or e.offset + e.bytes > arena_bytes):
            raise self._protocol(f"{context}: extent at {e.offset} of {e.bytes} bytes does not hold {need} bytes "
                                 f"inside the {arena_bytes}-byte arena")

    def release(self, lease_id: int) -> None:
        """Low level: ends a lease (``RELEASE``). ``get`` and ``put`` release their own."""
        body, _ = self._call(Op.RELEASE, [_wire.u64(lease_id)])
        _wire.empty_reply(body, "RELEASE reply")

    def _release_quietly(self, lease_id: int) -> None:
        try:
            self.release(lease_id)
        except KVTierConnectionError:
            pass  # closing the connection released it
        except KVTierError as e:
            if e.code != "notFound":
                raise

    # ------------------------------------------------------------ VRAM tier directory

    def vram_register_pool(self, device_uuid: str, slots: int, slot_bytes: int, handle: bytes) -> int:
        """Low level (``kvtier.vram.VramTier`` does this): tells kvtierd about a pool of ``slots``
        slots of ``slot_bytes`` in GPU memory (``VRAM_POOL``); ``handle`` is what other processes
        of this tenant need to map it. Returns the pool's id. The pool is this connection's: it
        is forgotten, with everything resident in it, when the connection closes."""
        uuid_bytes = device_uuid.encode()
        if not 0 < len(uuid_bytes) <= _wire.MAX_VRAM_UUID_BYTES:
            raise ValueError(f"a device UUID has 1...{_wire.MAX_VRAM_UUID_BYTES} bytes")
        if not 0 < slots <= _wire.MAX_VRAM_SLOTS or not 0 < slot_bytes <= _wire.MAX_VRAM_SLOT_BYTES:
            raise ValueError(f"a VRAM pool has 1...{_wire.MAX_VRAM_SLOTS} slots of 1...{_wire.MAX_VRAM_SLOT_BYTES} bytes")
        if not 0 < len(handle) <= _wire.MAX_VRAM_HANDLE_BYTES:
            raise ValueError(f"a VRAM pool handle has 1...{_wire.MAX_VRAM_HANDLE_BYTES} bytes")
        body, _ = self._call(Op.VRAM_POOL, [_wire.string(device_uuid, "deviceUUID"), _wire.u32(slots),
                                             _wire.u64(slot_bytes), _wire.u16(len(handle)), bytes(handle)])
        r = _wire.Reader(body, "VRAM_POOL reply")
        pool_id = r.u32()
        r.finish()
        if pool_id == 0:
            raise self._protocol("VRAM_POOL reply: pool id 0")
        return pool_id

    def vram_place(self, model: ModelRef, pool_id: int, tokens) -> "VramPlacement":
        """Low level: reserves slots of pool ``pool_id`` for the cached pages of ``tokens`` that
        it does not hold yet (``VRAM_PLACE``). Write each page into its slot, then
        ``vram_commit(lease_id)``; ``release(lease_id)`` gives the slots back unwritten."""
        spec, reg = self._spec(model)
        toks = self._tokens(tokens, truncate=True)
        body, _ = self._call(Op.VRAM_PLACE, [_wire.u64(reg.model_id), _wire.u32(pool_id), _wire.tokens_field(toks)])
        r = _wire.Reader(body, "VRAM_PLACE reply")
        lease_id, resident = r.u64(), r.u32()
        n = r.count("pages", _wire.MAX_TOKENS_PER_REQUEST, 12)
        pages = [tuple(r.unpack("III")) for _ in range(n)]
        r.finish()
        size = reg.page_tokens
        for index, t, _slot in pages:
            if not 0 < t <= size or index * size + t > len(toks) or index * size < resident:
                raise self._protocol(f"VRAM_PLACE reply: page {index} of {t} tokens for {len(toks)} tokens, "
                                     f"{resident} resident")
        if (lease_id == 0) != (n == 0) or resident > len(toks):
            raise self._protocol(f"VRAM_PLACE reply: lease {lease_id} for {n} pages, {resident} resident")
        return VramPlacement(lease_id, resident, pages)

    def vram_commit(self, lease_id: int) -> None:
        """Low level: the pages of a ``vram_place`` lease are written; they become resident."""
        body, _ = self._call(Op.VRAM_COMMIT, [_wire.u64(lease_id)])
        _wire.empty_reply(body, "VRAM_COMMIT reply")

    def vram_drop(self, pool_id: int) -> int:
        """Low level: takes pool ``pool_id`` (registered on this connection) out of kvtierd's
        directory (``VRAM_DROP``): no new lease or placement sees it. Returns the leases still
        reading from it; its memory may be freed once this returns 0."""
        body, _ = self._call(Op.VRAM_DROP, [_wire.u32(pool_id)])
        r = _wire.Reader(body, "VRAM_DROP reply")
        readers = r.u32()
        r.finish()
        return readers

    def vram_lease(self, model: ModelRef, tokens) -> "VramLease":
        """Low level: the leading pages of ``tokens``' cached prefix resident in one of this
        tenant's VRAM pools, and the pool (``VRAM_LEASE``). Their slots are not overwritten until
        ``release(lease.lease_id)``. ``tokens`` 0 in the answer: none resident."""
        spec, reg = self._spec(model)
        toks = self._tokens(tokens, truncate=True)
        body, _ = self._call(Op.VRAM_LEASE, [_wire.u64(reg.model_id), _wire.tokens_field(toks)])
        r = _wire.Reader(body, "VRAM_LEASE reply")
        pool_id = r.u32()
        device_uuid = r.string("deviceUUID")
        slots, slot_bytes = r.u32(), r.u64()
        handle = bytes(r.take(r.u16()))
        lease_id, served = r.u64(), r.u32()
        n = r.count("pages", _wire.MAX_TOKENS_PER_REQUEST, 8)
        pages = [tuple(r.unpack("II")) for _ in range(n)]
        r.finish()
        size = reg.page_tokens
        ok = served <= len(toks) and sum(t for t, _ in pages) == served and all(s < slots for _, s in pages)
        ok = ok and all(t == size for t, _ in pages[:-1]) and all(0 < t <= size for t, _ in pages[-1:])
        ok = ok and (served == 0) == (lease_id == 0)
        if not ok:
            raise self._protocol(f"VRAM_LEASE reply: {served} tokens in pages {pages[:4]}... of a {slots}-slot pool, "
                                 f"lease {lease_id}, for {len(toks)} tokens of {size}-token pages")
        return VramLease(pool_id, device_uuid, slots, slot_bytes, handle, lease_id, served, pages)

    # ------------------------------------------------------------ put

    @staticmethod
    def _as_bits(name: str, arr, spec: ModelSpec, n: int, shape=None) -> np.ndarray:
        arr = np.asarray(arr)
        want = tuple(shape) if shape is not None else spec.shape.kv_shape(n)
        if arr.shape != want:
            raise ValueError(f"{name} has shape {arr.shape}; model {spec.name!r} needs [layers, tokens, kv_heads, head_dim] = {list(want)}")
        dt = arr.dtype
        if spec.dtype == "float16":
            ok = dt == np.float16
        else:
            ok = dt in (np.dtype(np.uint16), np.dtype(np.int16)) or dt.name == "bfloat16"
        if not ok:
            kinds = "float16" if spec.dtype == "float16" else "uint16 bit patterns (or ml_dtypes.bfloat16)"
            raise TypeError(f"{name} has dtype {dt}; a {spec.dtype} model takes {kinds}; convert first")
        return arr.view(np.uint16)

    def put(self, model: ModelSpec, tokens, keys, values, session: Optional[str] = None, durable: bool = False) -> int:
        """Stores the KV of ``tokens`` and returns how many tokens are cached after it.

        ``keys``/``values``: ``[layers, len(tokens), kv_heads, head_dim]``. Only tokens past the
        already cached prefix are sent. ``durable``: return only once the new pages are on disk.
        """
        return self.put_detail(model, tokens, keys, values, session=session, durable=durable).cached_tokens

    def put_detail(self, model: ModelSpec, tokens, keys, values, session: Optional[str] = None,
                   durable: bool = False) -> PutResult:
        """``put``, returning what was done (pages added, tokens sent, requests made)."""
        spec, _ = self._spec(model)
        tokens = self._tokens(tokens, truncate=False)  # once: an iterator can be read only once
        n = len(tokens)
        if n == 0:
            raise ValueError("put needs at least one token")
        k16 = self._as_bits("keys", keys, spec, n)
        v16 = self._as_bits("values", values, spec, n)

        def fill(a: int, b: int, dest: np.ndarray) -> None:
            np.copyto(dest[:, 0], k16[:, a:b])
            np.copyto(dest[:, 1], v16[:, a:b])

        # `fill` only reads k16/v16 and writes its own destination: safe from several threads.
        return self.put_pages(model, tokens, fill, session=session, durable=durable, concurrent_fill=True)

    def put_pages(self, model: ModelSpec, tokens, fill: Callable[[int, int, np.ndarray], None], *,
                  session: Optional[str] = None, durable: bool = False, concurrent_fill: bool = False) -> PutResult:
        """Stores the KV of ``tokens``, asking ``fill`` for the bytes of what is not cached yet.

        ``fill(a, b, dest)`` writes the KV of tokens ``a..<b`` into ``dest``, a writable uint16
        array ``[layers, 2, b - a, kv_heads, head_dim]`` (keys at ``[:, 0]``, values at
        ``[:, 1]``, 16-bit patterns of the model's dtype). With shared memory ``dest`` lies in
        the staging arena, so the bytes are written once, where the daemon takes them; ``dest``
        is only valid during the call. Ranges never cross a page boundary and come in order,
        unless ``concurrent_fill``: then large batches call ``fill`` for different ranges from
        several threads at once (numpy copies release the GIL, so they use several cores);
        ``fill`` must then be thread-safe. Engines use this to copy straight from their own KV
        layout (``kvtier.engine``).
        """
        spec, reg = self._spec(model)
        toks = self._tokens(tokens, truncate=False)
        n = len(toks)
        if n == 0:
            raise ValueError("put needs at least one token")
        session_field = _wire.string(session or "", "session")
        flags = _wire.PUT_DURABLE if durable else 0
        # The cached prefix can shrink between LOOKUP and PUT (a concurrent put completing a
        # partial page supersedes it): the daemon then refuses the put and we start again.
        for attempt in range(3):
            cached = self.lookup(reg.model_id, toks)
            if cached >= n and not session and not durable:
                return PutResult(cached, 0, 0, 0)
            try:
                if cached >= n:
                    # Nothing to send, but the session must move to these tokens (or the pages
                    # become durable): a PUT without data.
                    return self._put_without_data(reg, toks, session_field, flags)
                if self.shared_memory:
                    return self._put_shared(spec, reg, toks, fill, cached, session_field, flags, concurrent_fill)
                return self._put_inline(spec, reg, toks, fill, cached, session_field, flags)
            except KVTierError as e:
                if e.code != "invalidArgument" or attempt == 2 or "cached" not in e.message:
                    raise
        raise AssertionError("unreachable")

    def _put_request(self, mid: int, session_field: bytes, flags: int, toks: np.ndarray, start: int) -> bytes:
        return _wire.u64(mid) + session_field + _wire.u8(flags) + _wire.tokens_field(toks) + _wire.u32(start)

    def _put_reply(self, body) -> Tuple[int, int]:
        r = _wire.Reader(body, "PUT reply")
        cached, new_pages = r.u32(), r.u32()
        r.finish()
        return cached, new_pages

    def _put_without_data(self, reg, toks, session_field, flags) -> PutResult:
        head = self._put_request(reg.model_id, session_field, flags | (0 if self.shared_memory else _wire.PUT_INLINE), toks, len(toks))
        body, _ = self._call(Op.PUT, [head, _wire.extents_field([]) if self.shared_memory else _wire.u64(0)])
        cached, added = self._put_reply(body)
        return PutResult(cached, added, 0, 1)

    def _put_shared(self, spec, reg, toks, fill, start, session_field, flags, concurrent_fill=False) -> PutResult:
        bpt = spec.bytes_per_token
        chunks = _chunks(start, len(toks), reg.page_tokens)
        # Batches of whole chunks: at most maxExtents and about SHM_BATCH_BYTES each, and a
        # quarter of the staging arena (the tenant's other connections stage there too).
        batch_bytes = max(1, min(SHM_BATCH_BYTES, self.staging_bytes // 4))
        batches: List[List[Tuple[int, int]]] = [[]]
        size = 0
        for c in chunks:
            cb = (c[1] - c[0]) * bpt
            if batches[-1] and (len(batches[-1]) >= _wire.MAX_EXTENTS or size + cb > batch_bytes):
                batches.append([])
                size = 0
            batches[-1].append(c)
            size += cb
        cached, new_pages, requests = start, 0, 0
        for batch in batches:
            lease, extents = self.alloc([(b - a) * bpt for a, b in batch])
            consumed = False
            try:
                def fill_chunk(chunk):
                    (a, b), e = chunk
                    count = spec.shape.page_elements(b - a)
                    dest = np.frombuffer(self._staging, dtype=np.uint16, count=count, offset=e.offset)
                    fill(a, b, dest.reshape(spec.shape.page_shape(b - a)))
                    del dest

                # Not from a fill thread itself (a put inside a fill would wait on its own pool).
                pool = _fill_pool() if concurrent_fill and len(batch) > 1 and \
                    sum(b - a for a, b in batch) * bpt >= PARALLEL_FILL_BYTES and \
                    not threading.current_thread().name.startswith("kvtier-fill") else None
                # Filled on several threads: extents that overlap would be written by two at once.
                # A daemon never hands such out; one that does is not followed.
                spans = sorted((e.offset, e.offset + e.bytes) for e in extents)
                if any(end > nxt for (_, end), (nxt, _) in zip(spans, spans[1:])):
                    raise ProtocolViolation("ALLOC returned overlapping extents: not filling them")
                if pool is None:
                    for chunk in zip(batch, extents):
                        fill_chunk(chunk)
                else:
                    # numpy releases the GIL while it copies: chunks fill on several cores. Every
                    # fill has finished before anything is raised: the staging memory must not be
                    # written once the lease below is released (another put may own it then).
                    from concurrent.futures import wait
                    futures = [pool.submit(fill_chunk, chunk) for chunk in zip(batch, extents)]
                    wait(futures)
                    for f in futures:
                        f.result()
                wire_extents = [Extent(e.offset, e.bytes, b - a) for (a, b), e in zip(batch, extents)]
                end = batch[-1][1]
                head = self._put_request(reg.model_id, session_field, flags, toks[:end], batch[0][0])
                body, _ = self._call(Op.PUT, [head, _wire.extents_field(wire_extents)])
                consumed = True
                cached, added = self._put_reply(body)
                new_pages += added
                requests += 1
            finally:
                # A PUT the daemon answered consumed every staging extent, which ended the ALLOC
                # lease (a RELEASE now could only answer notFound: a wasted round trip). Until
                # then the extents are the lease's, and a failure releases them.
                if not consumed and self._sock is not None:
                    self._release_quietly(lease)
        return PutResult(cached, new_pages, len(toks) - start, requests)

    def _put_inline(self, spec, reg, toks, fill, start, session_field, flags) -> PutResult:
        bpt, page = spec.bytes_per_token, reg.page_tokens
        n = len(toks)
        overhead = len(self._put_request(reg.model_id, session_field, flags, toks, 0)) + 8
        budget = self.max_inline_body - overhead
        if budget < bpt:
            raise KVTierError("tooLarge", f"one token of {spec.name!r} is {bpt} bytes; inline PUTs hold {budget}")
        cached, new_pages, requests = start, 0, 0
        s = start
        while s < n:
            e = min(n, s + budget // bpt)
            if e < n and (e // page) * page > s:
                e = (e // page) * page  # cut at a page boundary where one is in reach
            head = self._put_request(reg.model_id, session_field, flags | _wire.PUT_INLINE, toks[:e], s)
            data = bytearray((e - s) * bpt)
            at = 0
            for a, b in _chunks(s, e, page):
                count = spec.shape.page_elements(b - a)
                dest = np.frombuffer(data, dtype=np.uint16, count=count, offset=at)
                fill(a, b, dest.reshape(spec.shape.page_shape(b - a)))
                del dest
                at += count * 2
            body, _ = self._call(Op.PUT, [head, _wire.u64(len(data)), data])
            del data
            cached, added = self._put_reply(body)
            new_pages += added
            requests += 1
            s = e
        return PutResult(cached, new_pages, n - start, requests)

    # ------------------------------------------------------------ get

    def get(self, model: ModelSpec, tokens, max_tokens: int = 0,
            out: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> Tuple[np.ndarray, np.ndarray]:
        """The KV of the longest cached prefix of ``tokens`` (at most ``max_tokens``; 0: all).

        Returns ``(keys, values)``, each ``[layers, served, kv_heads, head_dim]`` (float16, or
        uint16 bit patterns for bfloat16); ``served`` may be 0. Without shared memory a reply is
        capped at the daemon's inline limit (64 MiB), so fewer tokens may come back.

        ``out=(keys, values)``: arrays ``[layers, T, kv_heads, head_dim]`` to fill instead of
        allocating (T at least ``len(tokens)``, or ``max_tokens``); the result is then
        ``out[i][:, :served]``. Reusing buffers avoids first-touch page faults on every call.
        """
        spec, _ = self._spec(model)
        tokens = self._tokens(tokens, truncate=True)  # once: an iterator can be read only once
        if out is not None:
            most = len(tokens)
            if max_tokens:
                most = min(most, int(max_tokens))
            if len(out) != 2:
                raise ValueError("out must be a pair (keys, values)")
            bits = []
            for name, arr in zip(("out keys", "out values"), out):
                if not isinstance(arr, np.ndarray) or arr.ndim != 4 or arr.shape[1] < most or not arr.flags.writeable:
                    raise ValueError(f"{name} must be a writable array [layers, >= {most}, kv_heads, head_dim]")
                bits.append(self._as_bits(name, arr, spec, arr.shape[1]))
            keys, values = bits
        else:
            keys = values = None
        shape = list(spec.shape.kv_shape(0))

        def begin(served: int) -> None:
            nonlocal keys, values
            if keys is None:
                shape[1] = served
                keys, values = np.empty(shape, dtype=np.uint16), np.empty(shape, dtype=np.uint16)

        def visit(a: int, page: np.ndarray) -> None:
            t = page.shape[2]
            keys[:, a:a + t] = page[:, 0]
            values[:, a:a + t] = page[:, 1]

        served = self.get_pages(model, tokens, visit, max_tokens=max_tokens, begin=begin)
        if out is not None:
            return out[0][:, :served], out[1][:, :served]
        return keys.view(spec.numpy_dtype), values.view(spec.numpy_dtype)

    def get_pages(self, model: ModelSpec, tokens, visit: Callable[[int, np.ndarray], None], *,
                  max_tokens: int = 0, begin: Optional[Callable[[int], None]] = None) -> int:
        """Serves the longest cached prefix of ``tokens`` page by page; returns how many tokens.

        ``visit(a, page)`` is called for each page in order, ``a`` its first token and ``page`` a
        read-only uint16 array ``[layers, 2, t, kv_heads, head_dim]`` (keys at ``[:, 0]``, values
        at ``[:, 1]``) holding tokens ``a..<a + t`` of the served prefix. With shared memory the
        page is a view of the daemon's page arena under a lease, so ``visit`` copies straight
        from it into wherever the engine keeps KV; the view is only valid during the call.
        ``begin(served)``, when given, is called once before the first page. Engines use this to
        restore into their own KV layout (``kvtier.engine``).
        """
        spec, reg = self._spec(model)
        toks = self._tokens(tokens, truncate=True)
        max_tokens = int(max_tokens)
        if not 0 <= max_tokens <= 0xFFFFFFFF:
            raise ValueError("max_tokens must be in 0...2**32-1")
        fetch = self._get_shared if self.shared_memory else self._get_inline
        return fetch(spec, reg, toks, max_tokens, begin or (lambda served: None), visit)

    def _get_shared(self, spec, reg, toks, max_tokens, begin, visit) -> int:
        page, bpt = reg.page_tokens, spec.bytes_per_token
        body, _ = self._call(Op.GET, [_wire.u64(reg.model_id), _wire.tokens_field(toks), _wire.u32(max_tokens), _wire.u8(0)])
        served, lease, r = _wire.get_reply_head(body, inline=False)
        try:
            extents = r.extents()
            r.finish()
            limit = min(len(toks), max_tokens) if max_tokens else len(toks)
            if served > limit:
                raise self._protocol(f"GET reply: {served} tokens served for a request of {limit}")
            for i, e in enumerate(extents):
                if not 1 <= e.tokens <= page or (i < len(extents) - 1 and e.tokens != page):
                    raise self._protocol(f"GET reply: page {i} holds {e.tokens} tokens (pages hold {page})")
                self._check_extent(e, e.tokens * bpt, "GET reply", self.arena_bytes)
            held = (len(extents) - 1) * page + extents[-1].tokens if extents else 0
            if served > held or (extents and served <= (len(extents) - 1) * page):
                raise self._protocol(f"GET reply: {served} tokens served from {len(extents)} pages holding {held}")
            begin(served)
            for i, e in enumerate(extents):
                a = i * page
                count = spec.shape.page_elements(e.tokens)
                src = np.frombuffer(self._mm, dtype=np.uint16, count=count, offset=e.offset)
                src = src.reshape(spec.shape.page_shape(e.tokens))
                visit(a, src[:, :, :min(e.tokens, served - a)])
                del src
        finally:
            if self._sock is not None:
                self._release_quietly(lease)
        return served

    def _get_inline(self, spec, reg, toks, max_tokens, begin, visit) -> int:
        page, bpt = reg.page_tokens, spec.bytes_per_token
        # The reply holds whole pages: cap what we ask for so it fits the inline limit.
        cap = ((self.max_inline_body - 20) // (page * bpt)) * page
        if cap == 0:
            raise KVTierError("tooLarge", f"one page of {spec.name!r} is {page * bpt} bytes, over the inline limit; use shared memory")
        if len(toks) > cap and (max_tokens == 0 or max_tokens > cap):
            max_tokens = cap
        body, _ = self._call(Op.GET, [_wire.u64(reg.model_id), _wire.tokens_field(toks), _wire.u32(max_tokens), _wire.u8(_wire.GET_INLINE)])
        served, lease, r = _wire.get_reply_head(body, inline=True)
        length = r.u64()
        if length != r.remaining():
            raise self._protocol(f"GET reply: inline data of {length} bytes in a body with {r.remaining()} left")
        limit = min(len(toks), max_tokens) if max_tokens else len(toks)
        pages = -(-served // page)
        held, rem = divmod(length, bpt)
        last = held - (pages - 1) * page if pages else 0
        if served > limit or rem or (pages == 0 and length) or (pages and not (served - (pages - 1) * page <= last <= page)):
            raise self._protocol(f"GET reply: {served} tokens served in {length} inline bytes (pages of {page} tokens, {bpt} bytes a token)")
        begin(served)
        at = r.at
        for i in range(pages):
            t = page if i < pages - 1 else last
            a = i * page
            count = spec.shape.page_elements(t)
            src = np.frombuffer(body, dtype=np.uint16, count=count, offset=at).reshape(spec.shape.page_shape(t))
            visit(a, src[:, :, :min(t, served - a)])
            del src
            at += count * 2
        if lease:
            self._release_quietly(lease)
        return served

    def lease_pages(self, model: ModelSpec, tokens, pages: Sequence[int]) -> "PageLease":
        """Chosen whole pages of ``tokens`` (``GET`` with a page list): page ``i`` holds tokens
        ``i * page_tokens ..< (i + 1) * page_tokens``; ``pages`` strictly increasing, and
        ``tokens`` must reach the end of the last one. Pages between them need not be cached.

        Returns a ``PageLease`` holding the leading pages of ``pages`` that kvtierd has (it stops
        at the first it lacks, or where the tenant's RAM quota is full): ``lease.pages`` lists
        them and ``lease.page(j)`` is the ``j``-th as a read-only uint16 array ``[layers, 2,
        page_tokens, kv_heads, head_dim]`` (keys at ``[:, 0]``). With shared memory that is a view
        of the daemon's page arena, valid until ``lease.release()`` (or the ``with`` block ends);
        inline, a copy. An offloading cache asks for the cold pages a decode step needs this way.
        """
        spec, reg = self._spec(model)
        toks = self._tokens(tokens, truncate=True)
        wanted = [int(p) for p in pages]
        if not wanted:
            return PageLease(self, [], [], 0)
        if len(wanted) > _wire.MAX_EXTENTS:
            raise ValueError(f"{len(wanted)} pages asked for; one GET serves at most {_wire.MAX_EXTENTS}")
        if any(b <= a for a, b in zip(wanted, wanted[1:])) or wanted[0] < 0:
            raise ValueError("page indices must be non-negative and strictly increasing")
        page = reg.page_tokens
        if (wanted[-1] + 1) * page > len(toks):
            raise ValueError(f"page {wanted[-1]} ends at token {(wanted[-1] + 1) * page}; only {len(toks)} tokens given")
        inline = not self.shared_memory
        flags = _wire.GET_PAGES | (_wire.GET_INLINE if inline else 0)
        body, _ = self._call(Op.GET, [_wire.u64(reg.model_id), _wire.tokens_field(toks), _wire.u32(0), _wire.u8(flags),
                                      _wire.u32(len(wanted)), np.asarray(wanted, dtype="<u4").tobytes()])
        served, lease, r = _wire.get_reply_head(body, inline=inline)
        shape = spec.shape.page_shape(page)
        count = spec.shape.page_elements(page)
        views: List[np.ndarray] = []
        try:
            if served % page or served // page > len(wanted):
                raise self._protocol(f"GET reply: {served} tokens served for {len(wanted)} pages of {page}")
            n = served // page
            if inline:
                length = r.u64()
                if length != r.remaining() or length != n * count * 2:
                    raise self._protocol(f"GET reply: {length} inline bytes for {n} pages of {count * 2}")
                for j in range(n):
                    views.append(np.frombuffer(body, dtype=np.uint16, count=count, offset=r.at + j * count * 2).reshape(shape))
            else:
                extents = r.extents()
                r.finish()
                if len(extents) != n:
                    raise self._protocol(f"GET reply: {len(extents)} extents for {n} pages served")
                for e in extents:
                    if e.tokens != page:
                        raise self._protocol(f"GET reply: a page of {e.tokens} tokens where whole pages of {page} were asked for")
                    self._check_extent(e, page * spec.bytes_per_token, "GET reply", self.arena_bytes)
                    views.append(np.frombuffer(self._mm, dtype=np.uint16, count=count, offset=e.offset).reshape(shape))
        except BaseException:
            views.clear()
            if lease and self._sock is not None:
                self._release_quietly(lease)
            raise
        return PageLease(self, wanted[:len(views)], views, lease)

    # ------------------------------------------------------------ attention, status

    def report_attention(self, model: ModelRef, tokens, page_mass: Iterable[float]) -> None:
        """Reports the attention mass a step put on each page of ``tokens`` (feeds eviction heat)."""
        mid = self._model_id(model)
        toks = self._tokens(tokens, truncate=False)
        mass = np.ascontiguousarray(np.asarray(list(page_mass) if not isinstance(page_mass, np.ndarray) else page_mass, dtype="<f4").ravel())
        if len(mass) > _wire.MAX_TOKENS_PER_REQUEST:
            raise ValueError(f"{len(mass)} page masses; the protocol allows {_wire.MAX_TOKENS_PER_REQUEST}")
        body, _ = self._call(Op.ATTENTION, [_wire.u64(mid), _wire.tokens_field(toks), _wire.u32(len(mass)), mass.tobytes()])
        _wire.empty_reply(body, "ATTENTION reply")

    def report_queries(self, model: ModelSpec, queries) -> None:
        """Reports a decoding step's attention queries for the daemon's codec policy to measure
        codecs with (docs/codecs.md, "Codec policy"); without them the keys stand in.

        ``queries``: ``[layers, count, query_heads, head_dim]`` after RoPE, in the model's dtype
        (float16, or bfloat16 as uint16 bit patterns or ``ml_dtypes.bfloat16``), ``count`` 1 to
        16, ``query_heads`` a multiple of the model's KV heads. The daemon keeps the latest few
        for this tenant and model; it ignores them when the model has its own codec or the
        policy is ``fixed``."""
        spec, _ = self._spec(model)
        arr = np.asarray(queries)
        if arr.ndim != 4 or arr.shape[0] != spec.layers or arr.shape[3] != spec.head_dim:
            raise ValueError(f"queries have shape {arr.shape}; model {spec.name!r} needs "
                             f"[layers, count, query_heads, head_dim] = [{spec.layers}, n, h, {spec.head_dim}]")
        layers, count, heads, dim = arr.shape
        if not 1 <= count <= _wire.MAX_QUERY_SAMPLE:
            raise ValueError(f"{count} queries per layer; send 1 to {_wire.MAX_QUERY_SAMPLE}")
        if heads < 1 or heads % spec.kv_heads:
            raise ValueError(f"{heads} query heads is not a multiple of the model's {spec.kv_heads} KV heads")
        bits = self._as_bits("queries", arr, spec, count, shape=(layers, count, heads, dim))
        body, _ = self._call(Op.QUERY_SAMPLE, [_wire.u64(spec.model_id()), struct.pack("<HHHH", layers, heads, dim, count),
                                               np.ascontiguousarray(bits).astype("<u2", copy=False).tobytes()])
        _wire.empty_reply(body, "QUERY_SAMPLE reply")

    def status(self) -> Dict[str, int]:
        """The daemon's counters and gauges (``ram_pages``, ``leases``, ``puts``, ...)."""
        body, _ = self._call(Op.STATUS)
        return _wire.status_reply(body)

    def pages(self, model: Optional[ModelRef] = None, limit: int = 1 << 30) -> Tuple[int, List[_wire.PageInfo]]:
        """``(total, pages)``: this tenant's pages (of one model, or all), RAM pages hottest first,
        then pages only on disk, most recently used first; at most ``limit``."""
        mid = 0 if model is None else self._model_id(model)
        out: List[_wire.PageInfo] = []
        total = 0
        while len(out) < limit:
            batch = min(_wire.MAX_PAGES_PER_REPLY, limit - len(out))
            body, _ = self._call(Op.PAGES, [_wire.u64(mid), _wire.u32(len(out)), _wire.u32(batch)])
            total, pages = _wire.pages_reply(body)
            out += pages
            if len(pages) < batch or len(out) >= total:
                break
        return total, out

    def evict(self, model: Optional[ModelRef] = None, tokens=None, *, session: Optional[str] = None,
              delete: bool = False) -> _wire.EvictResult:
        """Moves pages out of RAM now (to disk; with ``delete`` off disk too): the cached prefix of
        ``tokens`` (with ``model``), a ``session``'s pages (not counted as a use of it), or with
        neither every page of this tenant (of ``model`` when given). Leased pages and pinned
        sessions' pages stay."""
        if session is not None and (model is not None or tokens is not None):
            raise ValueError("evict: give a session, or a model and tokens, not both")
        if tokens is not None and model is None:
            raise ValueError("evict: tokens need their model")
        mid = 0 if model is None else self._model_id(model)
        toks = self._tokens([] if tokens is None else tokens, truncate=False)
        flags = (1 if delete else 0) | (2 if tokens is None and session is None else 0)
        body, _ = self._call(Op.EVICT, [_wire.u64(mid), _wire.tokens_field(toks), _wire.u8(flags),
                                        _wire.string(session or "", "session name")])
        return _wire.evict_reply(body)

    def models(self) -> List[_wire.RegisteredModel]:
        """The models this tenant registered since the daemon started, and its sessions' models
        (another tenant's are not listed), by id; fetched a page at a time."""
        return self._whole_list(Op.MODELS, _wire.models_reply)

    def codec_choices(self) -> List[_wire.CodecChoice]:
        """The disk codec of each model ``models()`` lists, as the daemon's codec policy decided it
        for this tenant (docs/codecs.md, "Codec policy"), by model id."""
        return self._whole_list(Op.CODECS, _wire.codecs_reply)

    def _whole_list(self, op: int, decode) -> list:
        """Every entry of a list request (``u32 offset, u32 limit`` → ``u32 total`` and a page)."""
        out: list = []
        while True:
            body, _ = self._call(op, [_wire.u32(len(out)), _wire.u32(_wire.MAX_LIST_ENTRIES)])
            total, entries = decode(body)
            out += entries
            if len(entries) < _wire.MAX_LIST_ENTRIES or len(out) >= total:
                return out

    def ping(self) -> None:
        """A round trip; raises if the daemon is gone."""
        body, _ = self._call(Op.PING)
        _wire.empty_reply(body, "PING reply")

    # ------------------------------------------------------------ sessions

    def list_sessions(self, limit: int = 1 << 30) -> List[_wire.SessionEntry]:
        """This tenant's sessions, most recently used first (at most ``limit``), fetched a page at
        a time; ``session_info`` tells where one's pages are."""
        out: List[_wire.SessionEntry] = []
        while len(out) < limit:
            batch = min(_wire.MAX_LIST_ENTRIES, limit - len(out))
            body, _ = self._call(Op.SESSION_LIST, [_wire.u32(len(out)), _wire.u32(batch)])
            total, entries = _wire.session_list_reply(body)
            out += entries
            if len(entries) < batch or len(out) >= total:
                break
        return out

    def session_info(self, name: str) -> SessionInfo:
        body, _ = self._call(Op.SESSION_INFO, [_wire.string(name, "session name")])
        return _wire.session_info_reply(body, "SESSION_INFO reply")

    def pin(self, name: str) -> None:
        body, _ = self._call(Op.SESSION_PIN, [_wire.string(name, "session name"), _wire.u8(1)])
        _wire.empty_reply(body, "SESSION_PIN reply")

    def unpin(self, name: str) -> None:
        body, _ = self._call(Op.SESSION_PIN, [_wire.string(name, "session name"), _wire.u8(0)])
        _wire.empty_reply(body, "SESSION_PIN reply")

    def set_ttl(self, name: str, seconds: int) -> None:
        """Session time to live in seconds (0: none)."""
        body, _ = self._call(Op.SESSION_TTL, [_wire.string(name, "session name"), _wire.u32(int(seconds))])
        _wire.empty_reply(body, "SESSION_TTL reply")

    def fork(self, source: str, target: str) -> SessionInfo:
        body, _ = self._call(Op.SESSION_FORK, [_wire.string(source, "session name"), _wire.string(target, "session name")])
        return _wire.session_info_reply(body, "SESSION_FORK reply")

    def delete_session(self, name: str) -> None:
        body, _ = self._call(Op.SESSION_DELETE, [_wire.string(name, "session name")])
        _wire.empty_reply(body, "SESSION_DELETE reply")

    def session_tokens(self, name: str) -> Tuple[int, np.ndarray]:
        """``(model_id, tokens)`` of a session."""
        body, _ = self._call(Op.SESSION_TOKENS, [_wire.string(name, "session name")])
        r = _wire.Reader(body, "SESSION_TOKENS reply")
        mid, toks = r.u64(), r.tokens()
        r.finish()
        return mid, toks


class PageLease:
    """Pages ``Client.lease_pages`` served: ``pages`` (their indices) and ``page(j)`` (the j-th,
    ``[layers, 2, page_tokens, kv_heads, head_dim]`` uint16). Shared-memory views stay valid
    until ``release()``, which a ``with`` block calls; a released lease serves nothing."""

    def __init__(self, client: "Client", pages: List[int], views: List[np.ndarray], lease_id: int):
        self._client = client
        self.pages = pages
        self._views = views
        self.lease_id = lease_id

    def page(self, j: int) -> np.ndarray:
        if self._views is None:
            raise ValueError("this lease was released: its pages may have moved")
        return self._views[j]

    def release(self) -> None:
        if self._views is None:
            return
        self._views = None
        if self.lease_id and self._client._sock is not None:
            self._client._release_quietly(self.lease_id)

    def __enter__(self) -> "PageLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
