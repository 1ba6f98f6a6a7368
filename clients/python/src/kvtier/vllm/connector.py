"""``KVTierConnector``: vLLM's v1 KV connector over kvtierd.

Loaded by vLLM from its configuration, without patching vLLM::

    KVTransferConfig(kv_connector="KVTierConnector", kv_connector_module_path="kvtier.vllm",
                     kv_role="kv_both", kv_connector_extra_config={"socket": "/run/kvtier/kvtierd.sock"})

The scheduler process asks kvtierd how much of each new request is cached (one ``LOOKUP`` per
request and tensor-parallel rank, whatever the prompt's length) and tells the workers, through
the step's metadata, which tokens to load into which blocks and which computed blocks to save.
Workers load synchronously before the forward pass, straight from the daemon's shared arena
into vLLM's blocks, and save on a background thread straight from vLLM's blocks into the
daemon's staging arena. A finished request keeps its blocks until its saves are done.

Nothing here can fail a request: a daemon that is down, slow or refuses is a miss, a warning
and a recompute; a load that stops short reports its blocks through vLLM's load-error path,
and vLLM recomputes them.

Keys: pages are chained over token ids by kvtierd itself (not vLLM's per-process block
hashes), under a model id that fingerprints everything that changes the KV: the model and its
revision and config, the KV dtype, the tensor-parallel rank and size, the LoRA adapter and the
request's ``cache_salt``. So caches survive engine and daemon restarts, and never mix models,
ranks, adapters or salts. Extra-config keys: docs/integrations/vllm.md.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, Tuple

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from .. import _wire
from ..engine import EngineCache, Hit, LoadFailed
from ..model import ModelSpec
from ._layout import PagedKV, blocks_of

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("kvtier.vllm")

_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}

# A waiting request's lookup is reused for this long: vLLM asks for every waiting request on
# every step, and a hit that went stale meanwhile costs a load error and a recompute, never bytes.
LOOKUP_REUSE_SECONDS = 1.0


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ConnectorSettings:
    """``kv_connector_extra_config``, checked. Defaults are documented in docs/integrations/vllm.md."""

    socket: Optional[str] = None
    page_tokens: int = 0
    disk_codec: str = "fp16+lz4"
    durable: bool = True
    namespace: str = "vllm"
    model_name: Optional[str] = None
    save_decode_tokens: bool = True
    timeout: float = 30.0
    retry_interval: float = 5.0
    vram_pages: int = 0

    @staticmethod
    def parse(extra: Dict[str, Any]) -> "ConnectorSettings":
        known = {f for f in ConnectorSettings.__dataclass_fields__}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"kvtier: unknown kv_connector_extra_config keys {unknown}; known: {sorted(known)}")
        s = ConnectorSettings(**extra)
        if s.socket is not None and not isinstance(s.socket, str):
            raise ValueError("kvtier: socket must be a path string")
        if not isinstance(s.page_tokens, int) or isinstance(s.page_tokens, bool) or not 0 <= s.page_tokens <= 0xFFFF:
            raise ValueError(f"kvtier: page_tokens must be an integer in 0...65535 (0: automatic), got {s.page_tokens!r}")
        if not isinstance(s.disk_codec, str):
            raise ValueError("kvtier: disk_codec must be a codec name such as 'fp16+lz4' or 'k4v4' ('' = the daemon's)")
        for name in ("durable", "save_decode_tokens"):
            if not isinstance(getattr(s, name), bool):
                raise ValueError(f"kvtier: {name} must be true or false")
        for name in ("timeout", "retry_interval"):
            v = getattr(s, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"kvtier: {name} must be a positive number of seconds, got {v!r}")
        if not isinstance(s.vram_pages, int) or isinstance(s.vram_pages, bool) or not 0 <= s.vram_pages <= _wire.MAX_VRAM_SLOTS:
            raise ValueError(f"kvtier: vram_pages must be an integer in 0...{_wire.MAX_VRAM_SLOTS}, got {s.vram_pages!r}")
        if not isinstance(s.namespace, str) or not s.namespace:
            raise ValueError("kvtier: namespace must be a non-empty string")
        return s


@dataclass(frozen=True)
class EngineShape:
    """What the worker's KV looks like, from vLLM's KV cache configuration."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    block_size: int
    num_blocks: int
    layer_names: Tuple[str, ...]

    @staticmethod
    def of(kv_cache_config: "KVCacheConfig") -> "EngineShape":
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, FullAttentionSpec):
            kinds = [type(g.kv_cache_spec).__name__ for g in groups]
            raise ValueError(f"kvtier: the connector handles models with one full-attention KV cache group; this one has {kinds} "
                             "(sliding-window, hybrid and Mamba models are not supported yet)")
        spec = groups[0].kv_cache_spec
        if getattr(spec, "head_size_v", spec.head_size) != spec.head_size:
            raise ValueError("kvtier: keys and values of different head sizes are not supported")
        if spec.dtype not in _DTYPES:
            raise ValueError(f"kvtier: the KV cache holds {spec.dtype}; KVTier stores float16 or bfloat16 KV "
                             "(start vLLM without --kv-cache-dtype fp8 to use it)")
        return EngineShape(layers=len(groups[0].layer_names), kv_heads=spec.num_kv_heads, head_dim=spec.head_size,
                           dtype=_DTYPES[spec.dtype], block_size=spec.block_size, num_blocks=kv_cache_config.num_blocks,
                           layer_names=tuple(groups[0].layer_names))


class Fingerprint:
    """Model specs for the requests of one engine: one per (tensor-parallel rank, LoRA, salt)."""

    def __init__(self, vllm_config: "VllmConfig", shape: EngineShape, settings: ConnectorSettings):
        mc = vllm_config.model_config
        pc = vllm_config.parallel_config
        if pc.pipeline_parallel_size != 1:
            raise ValueError("kvtier: pipeline parallelism is not supported yet (each stage holds other layers)")
        self.tp_size = pc.tensor_parallel_size
        try:
            config_text = mc.hf_config.to_json_string(use_diff=False)
        except Exception:  # a config class without JSON: its repr still tells models apart
            config_text = repr(mc.hf_config)
        digest = hashlib.blake2b(config_text.encode(), digest_size=6).hexdigest()
        model = settings.model_name or f"{mc.model}@{mc.revision or 'main'}"
        self._base = f"{settings.namespace}|{model}|cfg={digest}|{shape.dtype}"
        self.shape = shape
        self.settings = settings
        rope = getattr(mc.hf_config, "rope_theta", None)
        self.rope_theta = float(rope) if isinstance(rope, (int, float)) else 10000.0
        block = shape.block_size
        page = settings.page_tokens or block * max(1, 256 // block)
        if page % block:
            raise ValueError(f"kvtier: page_tokens {page} is not a multiple of vLLM's block size {block}")
        self.page_tokens = page

    def spec(self, rank: int, lora: Optional[str] = None, salt: Optional[str] = None) -> ModelSpec:
        name = f"{self._base}|tp={rank}/{self.tp_size}"
        if lora:
            name += f"|lora={lora}"
        if salt:
            name += "|salt=" + hashlib.blake2b(salt.encode(), digest_size=8).hexdigest()
        if len(name.encode()) > _wire.MAX_STRING_BYTES:
            name = name[:180] + "|" + hashlib.blake2b(name.encode(), digest_size=16).hexdigest()
        return ModelSpec(name, layers=self.shape.layers, kv_heads=self.shape.kv_heads, head_dim=self.shape.head_dim,
                         dtype=self.shape.dtype, page_tokens=self.page_tokens, rope_theta=self.rope_theta,
                         **({"disk_codec": self.settings.disk_codec} if self.settings.disk_codec else {}))


# ---------------------------------------------------------------- metadata


@dataclass(frozen=True)
class LoadJob:
    """Load tokens ``first..<len(tokens)`` of a request into its blocks."""

    req_id: str
    name_suffix: Tuple[Optional[str], Optional[str]]  # (lora, salt): the worker builds its rank's spec
    tokens: Tuple[int, ...]
    block_ids: Tuple[int, ...]
    first: int


@dataclass(frozen=True)
class SaveJob:
    """Store tokens of a request up to ``len(tokens)`` from its blocks (the daemon asks only for
    what it lacks)."""

    req_id: str
    name_suffix: Tuple[Optional[str], Optional[str]]
    tokens: Tuple[int, ...]
    block_ids: Tuple[int, ...]


@dataclass
class KVTierMetadata(KVConnectorMetadata):
    loads: List[LoadJob] = field(default_factory=list)
    saves: List[SaveJob] = field(default_factory=list)
    preempted: Set[str] = field(default_factory=set)


@dataclass
class _Tracked:
    """What the scheduler side knows of one request."""

    request: "Request"
    suffix: Tuple[Optional[str], Optional[str]]
    hit: Hit = Hit(0, 0, 0)
    # (tokens looked up, when): vLLM asks again every step while a request waits for blocks.
    looked_up: Optional[Tuple[int, float]] = None
    load: Optional[Tuple[int, int]] = None  # (first, last) once blocks are allocated
    block_ids: List[int] = field(default_factory=list)
    saved_upto: int = 0
    saving: bool = False


def _suffix(request: "Request") -> Tuple[Optional[str], Optional[str]]:
    lora = request.lora_request.lora_name if getattr(request, "lora_request", None) else None
    return lora, getattr(request, "cache_salt", None)


# ---------------------------------------------------------------- the connector


class KVTierConnector(KVConnectorBase_V1):
    """vLLM v1 KV connector storing and restoring prefix KV through kvtierd."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig" = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.settings = ConnectorSettings.parse(extra)
        self.shape = EngineShape.of(kv_cache_config)
        self.fingerprint = Fingerprint(vllm_config, self.shape, self.settings)
        self.block_size = self.shape.block_size
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = _SchedulerSide(self)
            self._worker = None
        else:
            self._scheduler = None
            self._worker = _WorkerSide(self)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a lost save is a future miss

    # ---- scheduler side

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> Tuple[Optional[int], bool]:
        return self._scheduler.matched(request, num_computed_tokens)

    def get_external_cache_hit_sources(self, request: "Request", num_external_tokens: int):
        return self._scheduler.hit_sources(request, num_external_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        self._scheduler.allocated(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        return self._scheduler.build(scheduler_output)

    def request_finished(self, request: "Request", block_ids: List[int]) -> Tuple[bool, Optional[Dict[str, Any]]]:
        return self._scheduler.finished(request, block_ids), None

    # ---- worker side

    def register_kv_caches(self, kv_caches: Dict[str, torch.Tensor]):
        self._worker.register(kv_caches)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        self._worker.load(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads finish in start_load_kv, before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata", **kwargs: Any) -> None:
        return  # saves are taken from the blocks once the step's forward pass is done (wait_for_save)

    def wait_for_save(self):
        self._worker.enqueue_saves(self._get_connector_metadata())

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata):
        self._worker.drain(kv_connector_metadata.preempted)

    def get_finished(self, finished_req_ids: Set[str]) -> Tuple[Optional[Set[str]], Optional[Set[str]]]:
        return self._worker.finished(finished_req_ids), None

    def get_block_ids_with_load_errors(self) -> Set[int]:
        return self._worker.take_load_errors()

    def shutdown(self):
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()


class _SchedulerSide:
    def __init__(self, connector: KVTierConnector):
        self.c = connector
        s = connector.settings
        self.cache = EngineCache(s.socket, timeout=s.timeout, retry_interval=s.retry_interval,
                                 client_name="vllm scheduler (kvtier.vllm)")
        self.block = connector.block_size
        self.tracked: Dict[str, _Tracked] = {}
        self.finishing: List[SaveJob] = []
        self.specs: Dict[Tuple[int, Tuple[Optional[str], Optional[str]]], ModelSpec] = {}

    def spec(self, rank: int, suffix: Tuple[Optional[str], Optional[str]]) -> ModelSpec:
        key = (rank, suffix)
        s = self.specs.get(key)
        if s is None:
            s = self.specs[key] = self.c.fingerprint.spec(rank, *suffix)
        return s

    def _track(self, request: "Request") -> _Tracked:
        t = self.tracked.get(request.request_id)
        if t is None:
            t = self.tracked[request.request_id] = _Tracked(request, _suffix(request))
        return t

    def matched(self, request: "Request", num_computed: int) -> Tuple[int, bool]:
        t = self._track(request)
        tokens = request.all_token_ids
        if len(tokens) - 1 < num_computed + self.block:
            t.hit = Hit(0, 0, 0)
            return 0, False
        now = time.monotonic()
        if t.looked_up is None or t.looked_up[0] != len(tokens) or now - t.looked_up[1] > LOOKUP_REUSE_SECONDS:
            hit: Optional[Hit] = None
            for rank in range(self.c.fingerprint.tp_size):  # every rank must hold its share
                h = self.cache.lookup(self.spec(rank, t.suffix), tokens, block=self.block)
                hit = h if hit is None or h.tokens < hit.tokens else hit
                if hit.tokens <= num_computed:
                    break
            t.hit, t.looked_up = hit, (len(tokens), now)
        hit = t.hit
        if hit.tokens <= num_computed:
            return 0, False
        return hit.tokens - num_computed, False

    def hit_sources(self, request: "Request", external: int):
        from vllm.v1.metrics.cache_hit_source import CacheHitSource

        t = self.tracked.get(request.request_id)
        if external <= 0 or t is None:
            return {}
        begin = t.hit.tokens - external
        ram = max(0, min(t.hit.ram, t.hit.tokens) - begin)
        out = {}
        if ram:
            out[CacheHitSource.HOST] = ram
        if external - ram:
            out[CacheHitSource.DISK] = external - ram
        return out

    def allocated(self, request: "Request", external: int) -> None:
        t = self._track(request)
        if external > 0:
            t.load = (t.hit.tokens - external, t.hit.tokens)

    def _plan_save(self, meta: KVTierMetadata, t: _Tracked, computed: int) -> None:
        end = min(computed, t.request.num_prompt_tokens)
        end -= end % self.block
        if end <= t.saved_upto or end // self.block > len(t.block_ids):
            return
        meta.saves.append(SaveJob(t.request.request_id, t.suffix, tuple(t.request.all_token_ids[:end]),
                                  tuple(t.block_ids[:end // self.block])))
        t.saved_upto = end
        t.saving = True

    def _plan_load(self, meta: KVTierMetadata, t: _Tracked) -> None:
        if t.load is None:
            return
        first, last = t.load
        t.load = None
        meta.loads.append(LoadJob(t.request.request_id, t.suffix, tuple(t.request.all_token_ids[:last]),
                                  tuple(t.block_ids[:-(-last // self.block)]), first))
        t.saved_upto = max(t.saved_upto, last)  # the daemon has these already

    def build(self, so: "SchedulerOutput") -> KVTierMetadata:
        meta = KVTierMetadata(preempted=set(so.preempted_req_ids or ()))
        for new in so.scheduled_new_reqs:
            t = self.tracked.get(new.req_id)
            if t is None:
                continue
            t.block_ids = list(new.block_ids[0])
            self._plan_load(meta, t)
            self._plan_save(meta, t, new.num_computed_tokens + so.num_scheduled_tokens.get(new.req_id, 0))
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            t = self.tracked.get(req_id)
            if t is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                t.block_ids = list(new_blocks[0]) if new_blocks else []
            elif new_blocks is not None:
                t.block_ids.extend(new_blocks[0])
            self._plan_load(meta, t)
            self._plan_save(meta, t, cached.num_computed_tokens[i] + so.num_scheduled_tokens.get(req_id, 0))
        meta.saves.extend(self.finishing)
        self.finishing = []
        return meta

    def finished(self, request: "Request", block_ids) -> bool:
        t = self.tracked.pop(request.request_id, None)
        if t is None:
            return False
        if block_ids and isinstance(block_ids[0], (list, tuple)):
            block_ids = block_ids[0]
        if self.c.settings.save_decode_tokens:
            end = min(request.num_computed_tokens, len(request.all_token_ids))
            end -= end % self.block
            if end > t.saved_upto and end // self.block <= len(block_ids):
                self.finishing.append(SaveJob(request.request_id, t.suffix, tuple(request.all_token_ids[:end]),
                                              tuple(block_ids[:end // self.block])))
                t.saving = True
        return t.saving

    def shutdown(self) -> None:
        self.cache.close()


class _WorkerSide:
    def __init__(self, connector: KVTierConnector):
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        self.c = connector
        self.rank = get_tensor_model_parallel_rank()
        s = connector.settings
        name = f"vllm worker rank {self.rank} (kvtier.vllm)"
        self.loader = EngineCache(s.socket, timeout=s.timeout, retry_interval=s.retry_interval, client_name=name + " loads")
        self.saver = EngineCache(s.socket, timeout=s.timeout, retry_interval=s.retry_interval, client_name=name + " saves")
        self.paged: Optional[PagedKV] = None
        self.vram = None  # kvtier.vram.VramTier when vram_pages > 0 and the pool could be made
        # Loads (the model runner's thread) and placements (the saver thread) share the tier; a
        # failure in one stops it, so the other must not be copying from the pool meanwhile.
        self.vram_lock = threading.Lock()
        self.specs: Dict[Tuple[Optional[str], Optional[str]], ModelSpec] = {}
        self.load_errors: Set[int] = set()
        self.cond = threading.Condition()
        self.inflight: Dict[str, int] = {}
        self.had_saves: Set[str] = set()
        self.finishing: Set[str] = set()
        self.jobs: "queue.Queue[Optional[SaveJob]]" = queue.Queue()
        self.thread = threading.Thread(target=self._save_loop, name="kvtier-saver", daemon=True)
        self.thread.start()

    def spec(self, suffix: Tuple[Optional[str], Optional[str]]) -> ModelSpec:
        s = self.specs.get(suffix)
        if s is None:
            s = self.specs[suffix] = self.c.fingerprint.spec(self.rank, *suffix)
        return s

    def register(self, kv_caches: Dict[str, torch.Tensor]) -> None:
        from vllm.platforms import current_platform

        shape = self.c.shape
        caches = {name: kv_caches[name] for name in shape.layer_names if name in kv_caches}
        if len(caches) != shape.layers:
            raise ValueError(f"kvtier: vLLM registered {len(caches)} of the {shape.layers} attention layers' KV caches")
        split = "cpu" if current_platform.is_cpu() else "last-dim"
        self.paged = PagedKV(caches, shape.num_blocks, shape.block_size, shape.kv_heads, shape.head_dim, split)
        if self.c.settings.vram_pages:
            self._start_vram()

    # ---- the VRAM tier (vram_pages > 0): a pool on the KV's device, shared with other workers

    def _start_vram(self) -> None:
        from .. import Client
        from ..vram import VramTier

        s = self.c.settings
        try:
            client = Client(s.socket, timeout=s.timeout, shared_memory=False,
                            client_name=f"vllm worker rank {self.rank} (kvtier.vllm) vram")
            tier = VramTier(client)
            tier.create_pool(self.paged.device, s.vram_pages, model=self.spec((None, None)))
        except Exception as e:  # no daemon, no CUDA IPC, no GPU memory: the RAM and disk tiers still serve
            log.warning("kvtier: VRAM tier not started (%s); loads come from kvtierd's RAM and disk", e)
            return
        self.vram = tier
        log.info("kvtier: VRAM pool of %d pages on %s registered as pool %d", s.vram_pages, self.paged.device,
                 tier.pool_id)

    def _vram_failed(self, what: str, e: Exception) -> None:
        from ..errors import KVTierConnectionError

        log.warning("kvtier: VRAM tier %s failed (%s)%s", what, e,
                    "; VRAM tier off" if isinstance(e, KVTierConnectionError) else "")
        if isinstance(e, KVTierConnectionError):
            self._stop_vram()

    def _stop_vram(self) -> None:
        """Called with ``vram_lock`` held, or when no other thread uses the tier."""
        tier, self.vram = self.vram, None
        if tier is not None:
            client = tier.client
            tier.close()
            client.close()

    def _load_vram(self, spec: ModelSpec, job) -> bool:
        """The whole of ``job`` from a VRAM pool, device to device; False when no pool holds it."""
        paged, blocks, first = self.paged, job.block_ids, job.first
        try:
            if self.vram is None:
                return False
            served = self.vram.restore_into(spec, job.tokens, lambda a, page: paged.scatter_tensor(blocks, a, page, first),
                                            min_tokens=len(job.tokens))
        except Exception as e:
            self._vram_failed("load", e)
            return False
        return served == len(job.tokens)

    def _place_vram(self, spec: ModelSpec, job) -> None:
        """Copies the saved pages this worker's pool lacks into it, from the request's blocks."""
        paged, blocks = self.paged, job.block_ids
        try:
            if self.vram is None:
                return
            self.vram.place_from(spec, job.tokens, lambda a, b, page: paged.gather_tensor(blocks, a, b, page))
        except Exception as e:
            self._vram_failed("placement", e)

    # ---- loads (synchronous, before the forward pass)

    def load(self, meta: KVTierMetadata) -> None:
        if self.paged is None:
            return
        block = self.c.block_size
        for job in meta.loads:
            paged, blocks, first = self.paged, job.block_ids, job.first
            if self.vram is not None:
                with self.vram_lock:
                    from_vram = self._load_vram(self.spec(job.name_suffix), job)
                if from_vram:
                    continue
            try:
                self.loader.load(self.spec(job.name_suffix), job.tokens,
                                 lambda a, page: paged.scatter(blocks, a, page, first),
                                 pin_cuda=paged.device.type == "cuda")
            except LoadFailed as e:
                good = max(first, e.loaded - e.loaded % block)
                bad = blocks_of(blocks, block, good, len(job.tokens))
                log.warning("kvtier: request %s: loaded %d of %d tokens (%s); vLLM recomputes %d blocks",
                            job.req_id, max(good, first), len(job.tokens), e.why, len(bad))
                self.load_errors.update(bad)

    def take_load_errors(self) -> Set[int]:
        errors, self.load_errors = self.load_errors, set()
        return errors

    # ---- saves (on the saver thread, after the forward pass)

    def enqueue_saves(self, meta: KVTierMetadata) -> None:
        for job in meta.saves:
            with self.cond:
                # The scheduler delays freeing this request's blocks: it must hear back.
                self.had_saves.add(job.req_id)
                if self.paged is None:
                    continue
                self.inflight[job.req_id] = self.inflight.get(job.req_id, 0) + 1
            self.jobs.put(job)

    def _save_loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                paged, blocks = self.paged, job.block_ids
                self.saver.store(self.spec(job.name_suffix), job.tokens,
                                 lambda a, b, dest: paged.gather(blocks, a, b, dest),
                                 durable=self.c.settings.durable)
                if self.vram is not None:
                    with self.vram_lock:
                        self._place_vram(self.spec(job.name_suffix), job)
            except Exception:  # a bug here must not kill the thread that frees finished requests' blocks
                log.exception("kvtier: saving request %s failed", job.req_id)
            finally:
                with self.cond:
                    left = self.inflight[job.req_id] - 1
                    if left:
                        self.inflight[job.req_id] = left
                    else:
                        del self.inflight[job.req_id]
                    self.cond.notify_all()

    def drain(self, req_ids: Set[str]) -> None:
        """Waits for the saves of preempted requests: vLLM frees their blocks right away."""
        with self.cond:
            self.cond.wait_for(lambda: not (req_ids & self.inflight.keys()))

    def finished(self, finished_req_ids: Set[str]) -> Optional[Set[str]]:
        with self.cond:
            self.finishing |= finished_req_ids & self.had_saves
            done = {r for r in self.finishing if r not in self.inflight}
            self.finishing -= done
            self.had_saves -= done
        return done or None

    def shutdown(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=self.c.settings.timeout)
        with self.vram_lock:
            self._stop_vram()
        self.loader.close()
        self.saver.close()
