"""What an inference engine needs from kvtierd, whatever the engine.

An engine adapter (``kvtier.vllm`` today; an LMCache or SGLang HiCache storage backend would be
another thin file) keeps KV in its own paged layout and asks three things of the cache:

- ``lookup``: how many leading tokens of a request can be restored, cut to the engine's block
  size and leaving at least one token to compute; one request to the daemon per call, however
  long the prompt.
- ``load``: the pages of a prefix, each handed to a callback as a view of the daemon's shared
  arena, so the engine copies straight into its KV blocks.
- ``store``: the same in reverse: a callback fills the daemon's staging arena from the engine's
  blocks; only pages the daemon lacks are asked for.

The cache must never fail a request: ``EngineCache`` turns a dead or missing daemon into a miss
and a warning, reconnects at most every ``retry_interval`` seconds, and reports what it did in
``stats``. Calls on one ``EngineCache`` are serialized; use one per thread that must not wait
for another (a loader and a saver).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import numpy as np

from .client import Client, LookupResult, PutResult
from .errors import KVTierConnectionError, KVTierError
from .model import ModelSpec

log = logging.getLogger("kvtier.engine")

#: ``fill(a, b, dest)``: write the KV of tokens ``a..<b`` into ``dest`` ``[layers, 2, b-a, heads, dim]``.
Fill = Callable[[int, int, np.ndarray], None]
#: ``sink(a, page)``: take the KV of tokens ``a..<a+t`` from ``page`` ``[layers, 2, t, heads, dim]``.
Sink = Callable[[int, np.ndarray], None]


@dataclass(frozen=True)
class Hit:
    """A usable cached prefix: ``tokens`` (block-aligned) of which ``ram``/``disk`` come from each tier."""

    tokens: int
    ram: int
    disk: int


@dataclass
class EngineStats:
    """Counters since the EngineCache was made (or since ``reset``)."""

    lookups: int = 0
    hit_tokens: int = 0
    loaded_tokens: int = 0
    load_failures: int = 0
    stored_tokens: int = 0
    store_failures: int = 0
    unavailable: int = 0
    load_seconds: float = 0.0
    store_seconds: float = 0.0
    by_reason: Dict[str, int] = field(default_factory=dict)


class LoadFailed(Exception):
    """A load stopped short: ``loaded`` leading tokens arrived, the rest must be recomputed."""

    def __init__(self, loaded: int, why: str):
        super().__init__(why)
        self.loaded = loaded
        self.why = why


class EngineCache:
    """One connection to kvtierd on behalf of an engine, failing soft.

    ``socket_path`` None is the daemon's default socket. ``timeout`` bounds each socket wait
    (seconds). ``retry_interval``: after the daemon was found unavailable, how long calls answer
    "miss" before connecting again.
    """

    def __init__(self, socket_path: Optional[str] = None, *, timeout: float = 30.0, retry_interval: float = 5.0,
                 client_name: str = "kvtier-engine", connect: Callable[..., Client] = Client):
        self.socket_path = socket_path
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.client_name = client_name
        self.stats = EngineStats()
        self._connect = connect
        self._client: Optional[Client] = None
        self._down_until = 0.0
        self._down_reason: Optional[str] = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ connection

    def _get_client(self) -> Optional[Client]:
        if self._client is not None and not self._client.closed:
            return self._client
        now = time.monotonic()
        if now < self._down_until:
            return None
        try:
            self._client = self._connect(self.socket_path, timeout=self.timeout, client_name=self.client_name)
        except (KVTierConnectionError, KVTierError, OSError) as e:
            self._mark_down(f"{e}")
            return None
        if self._down_reason is not None:
            log.warning("kvtier: reconnected to kvtierd at %s", self._client.socket_path)
            self._down_reason = None
        return self._client

    def _mark_down(self, why: str) -> None:
        self.stats.unavailable += 1
        if self._client is not None:
            self._client.close()
            self._client = None
        self._down_until = time.monotonic() + self.retry_interval
        if self._down_reason is None:
            log.warning("kvtier: kvtierd unavailable (%s); requests recompute, retrying every %.0f s", why, self.retry_interval)
        self._down_reason = why

    def _count(self, reason: str) -> None:
        self.stats.by_reason[reason] = self.stats.by_reason.get(reason, 0) + 1

    @property
    def available(self) -> bool:
        """Whether the last call reached the daemon (False while waiting to retry)."""
        return self._down_reason is None

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # ------------------------------------------------------------ the three calls

    def lookup(self, model: ModelSpec, tokens, *, block: int = 1, leave: int = 1) -> Hit:
        """The restorable prefix of ``tokens``: cut down to a multiple of ``block`` and to at most
        ``len(tokens) - leave`` (an engine must compute the last prompt token itself)."""
        with self._lock:
            self.stats.lookups += 1
            client = self._get_client()
            if client is None:
                return Hit(0, 0, 0)
            try:
                r: LookupResult = client.lookup_detail(model, tokens)
            except KVTierConnectionError as e:
                self._mark_down(str(e))
                return Hit(0, 0, 0)
            except KVTierError as e:
                log.warning("kvtier: LOOKUP failed: %s", e)
                self._count(e.code)
                return Hit(0, 0, 0)
            usable = min(r.cached_tokens, max(0, len(tokens) - leave))
            usable -= usable % max(1, block)
            ram = min(r.ram_tokens, usable)
            self.stats.hit_tokens += usable
            return Hit(usable, ram, usable - ram)

    def load(self, model: ModelSpec, tokens, sink: Sink, *, pin_cuda: bool = False) -> int:
        """Hands the cached KV of ``tokens`` to ``sink`` page by page; returns the tokens loaded.

        ``pin_cuda``: the sink copies pages to a GPU; each page's part of the shared arena is
        registered with CUDA first (``kvtier.torch.pin_pages``; needs torch), so the copy is DMA.

        Raises ``LoadFailed`` (with how many leading tokens did arrive) when fewer than
        ``len(tokens)`` come back: the daemon went away, the pages were evicted and deleted since
        the lookup, or a page failed its checksum. The caller recomputes the rest.
        """
        want = len(tokens)
        with self._lock:
            started = time.perf_counter()
            client = self._get_client()
            if client is None:
                self.stats.load_failures += 1
                raise LoadFailed(0, f"kvtierd unavailable: {self._down_reason}")
            done = 0
            pin = None
            if pin_cuda:
                from .torch import pin_pages as pin

            def visit(a: int, page: np.ndarray) -> None:
                nonlocal done
                if pin is not None:
                    pin(client, page)
                sink(a, page)
                done = a + page.shape[2]

            try:
                served = client.get_pages(model, tokens, visit)
            except KVTierConnectionError as e:
                self._mark_down(str(e))
                self.stats.load_failures += 1
                raise LoadFailed(done, str(e)) from None
            except KVTierError as e:
                self._count(e.code)
                self.stats.load_failures += 1
                raise LoadFailed(done, str(e)) from None
            finally:
                self.stats.load_seconds += time.perf_counter() - started
            self.stats.loaded_tokens += served
            if served < want:
                self.stats.load_failures += 1
                raise LoadFailed(served, f"kvtierd served {served} of {want} tokens (evicted since the lookup?)")
            return served

    def store(self, model: ModelSpec, tokens, fill: Fill, *, durable: bool = True) -> Optional[PutResult]:
        """Stores the KV of ``tokens``, asking ``fill`` only for what the daemon lacks. Returns
        None (after a warning) when the daemon is unavailable or refuses: a lost save is a
        future miss, never an error for the request."""
        with self._lock:
            started = time.perf_counter()
            client = self._get_client()
            if client is None:
                self.stats.store_failures += 1
                return None
            try:
                result = client.put_pages(model, tokens, fill, durable=durable)
            except KVTierConnectionError as e:
                self._mark_down(str(e))
                self.stats.store_failures += 1
                return None
            except KVTierError as e:
                self._count(e.code)
                self.stats.store_failures += 1
                log.warning("kvtier: PUT of %d tokens refused: %s", len(tokens), e)
                return None
            finally:
                self.stats.store_seconds += time.perf_counter() - started
            self.stats.stored_tokens += result.sent_tokens
            return result
