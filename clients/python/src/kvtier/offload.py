"""Attention-weighted paging of one long sequence's KV through kvtierd (PyTorch only).

A decoding process keeps resident, per layer and KV head: the first pages (attention sinks), a
window of recent tokens, and a few promoted pages. Every whole page before the window is stored
in kvtierd (RAM or disk). At each decode step and layer, a small resident summary of each cold
page (per-channel minimum and maximum of its keys) bounds the score the query can give the page;
the pages with the highest bounds are fetched from kvtierd (``GET`` with a page list: only those
pages) and attention runs over resident plus fetched tokens. The attention mass each page then
actually gets feeds a moving average: a fetched page whose average passes ``promote_mass`` is
promoted (kept resident, no more fetching); a promoted page leaves only after ``patience`` steps
below ``demote_mass`` (sticky), and replaces another only with ``swap_margin`` times its mass,
one swap per step, so pages do not thrash. After each step the cache reports, per page, the
attention the summaries predict for the next one (``ATTENTION``): kvtierd reads those pages
from disk into RAM before they are asked for. docs/attention-offload.md describes the method.

``kvtier.transformers.OffloadedCache`` runs this inside a Transformers model; this module knows
nothing of Transformers. Tensors may live on any torch device (the math is plain torch);
kvtierd's pages arrive in host memory and are copied to the device per layer.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

try:
    import torch as _torch
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("kvtier.offload needs PyTorch: pip install torch (kvtier itself needs only NumPy)") from e

from .client import Client, PageLease
from .errors import KVTierError
from .model import ModelSpec
from .torch import torch_dtype

MODES = ("summary", "promote", "window")


@dataclass(frozen=True)
class OffloadPlan:
    """How many tokens a step attends to, and how pages move.

    Per layer and KV head a step attends to ``sink_pages`` pages, the window (``window_tokens``
    up to ``window_tokens + page_tokens - 1`` recent tokens: it gives up a page at a time),
    ``promoted_pages`` promoted pages and ``fetch_pages`` pages fetched for this step;
    ``max_attended_tokens`` is the sum. The first ``dense_layers`` layers fetch every cold page
    instead (early layers attend diffusely; ``for_budget`` then gives the others less, so the
    average over layers keeps to the budget). ``mode``:

    - ``"summary"``: fetch by key-bound summaries, promote by observed mass (this module's method);
    - ``"promote"``: no fetching; pages are promoted only by mass observed while they were visible
      (in the prompt's last row, or in the window), the Monarch-style window-plus-threshold policy;
    - ``"window"``: sinks and a sliding window only (StreamingLLM).
    """

    page_tokens: int
    window_tokens: int
    promoted_pages: int = 0
    fetch_pages: int = 0
    sink_pages: int = 1
    mode: str = "summary"
    promote_mass: float = 0.02
    demote_mass: float = 0.005
    patience: int = 8
    decay: float = 0.7
    swap_margin: float = 2.0
    dense_layers: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.page_tokens < 1 or self.window_tokens < 1 or self.sink_pages < 0:
            raise ValueError("page_tokens and window_tokens must be at least 1, sink_pages at least 0")
        if self.promoted_pages < 0 or self.fetch_pages < 0:
            raise ValueError("promoted_pages and fetch_pages must be at least 0")
        if self.mode != "summary" and self.fetch_pages:
            raise ValueError(f"mode {self.mode!r} fetches nothing: set fetch_pages=0")
        if self.mode == "window" and self.promoted_pages:
            raise ValueError("mode 'window' promotes nothing: set promoted_pages=0")
        if self.dense_layers < 0 or (self.dense_layers and self.mode != "summary"):
            raise ValueError("dense_layers (first layers that fetch every cold page) needs mode 'summary'")
        if not 0 <= self.decay < 1 or self.demote_mass > self.promote_mass or self.patience < 1 or self.swap_margin < 1:
            raise ValueError("need 0 <= decay < 1, demote_mass <= promote_mass, patience >= 1, swap_margin >= 1")

    @property
    def max_attended_tokens(self) -> int:
        p = self.page_tokens
        return self.sink_pages * p + self.window_tokens + p - 1 + (self.promoted_pages + self.fetch_pages) * p

    @classmethod
    def for_budget(cls, budget_tokens: int, page_tokens: int, mode: str = "summary", *,
                   window_pages: Optional[int] = None, promoted_share: float = 0.25, dense_layers: int = 0,
                   layers: int = 0, context_tokens: int = 0, **policy) -> "OffloadPlan":
        """A plan attending to at most ``budget_tokens`` per step: one sink page, then
        ``"window"``: the rest as window; otherwise a window of ``window_pages`` pages (default:
        an eighth of the budget, at least 4 pages) and the rest as page slots, ``promoted_share``
        of them promoted and the others fetched (``"summary"``) or all promoted (``"promote"``).
        With ``dense_layers`` of the model's ``layers`` attending to all ``context_tokens``, the
        other layers share what is left of ``layers × budget``."""
        p = page_tokens
        if window_pages is None:
            window_pages = max(4, round(budget_tokens / 8 / p))
        if dense_layers:
            if not 0 < dense_layers < layers or context_tokens <= 0:
                raise ValueError("dense_layers needs layers (more than dense_layers) and context_tokens")
            budget_tokens = (layers * budget_tokens - dense_layers * context_tokens) // (layers - dense_layers)
            policy["dense_layers"] = dense_layers
        if mode == "window":
            return cls(page_tokens=p, window_tokens=budget_tokens - 2 * p + 1, mode=mode, **policy)
        window = window_pages * p
        slots = (budget_tokens - p - (window + p - 1)) // p
        if slots < 1 or window < 1:
            raise ValueError(f"a budget of {budget_tokens} tokens leaves no page slot beside a sink page and "
                             f"{window_pages} window pages of {p}: raise the budget or use fewer window pages")
        if mode == "promote":
            return cls(page_tokens=p, window_tokens=window, promoted_pages=slots, mode=mode, **policy)
        promoted = int(round(slots * promoted_share))
        return cls(page_tokens=p, window_tokens=window, promoted_pages=promoted, fetch_pages=slots - promoted,
                   mode=mode, **policy)


@dataclass
class OffloadStats:
    """What the cache did, summed over steps."""

    steps: int = 0
    pages_fetched: int = 0           # (layer, head, page) selections served from kvtierd pages
    pages_leased: int = 0            # distinct pages leased (each at most once a step)
    lease_requests: int = 0          # GETs with a page list
    promotions: int = 0
    demotions: int = 0
    pages_offloaded: int = 0         # pages put into kvtierd
    attended_tokens_max: int = 0     # most tokens one step of a non-dense layer attended to (per head)
    attended_tokens_sum: int = 0     # tokens attended, summed over layers and steps (head 0)
    attended_layer_steps: int = 0
    fetched_by_step: List[int] = field(default_factory=list)


class _Layer:
    """One layer's resident KV: sinks, promoted slots, window; and summaries of every page."""

    def __init__(self, heads: int, dim: int, plan: OffloadPlan, dtype, device):
        p, h = plan.page_tokens, heads
        self.sink_k = self.sink_v = None                       # [H, S, D]
        self.win_k = self.win_v = None                         # [H, W, D]
        m = plan.promoted_pages
        self.prom_k = _torch.zeros(h, m, p, dim, dtype=dtype, device=device)
        self.prom_v = _torch.zeros(h, m, p, dim, dtype=dtype, device=device)
        self.prom_ids = _torch.full((h, m), -1, dtype=_torch.long, device=device)
        self.prom_low = _torch.zeros(h, m, dtype=_torch.long, device=device)   # steps below demote_mass
        self.kmin = _torch.zeros(h, 0, dim, dtype=_torch.float32, device=device)  # [H, pages, D]
        self.kmax = _torch.zeros(h, 0, dim, dtype=_torch.float32, device=device)
        self.mass = _torch.zeros(h, 0, dtype=_torch.float32, device=device)      # moving average, [H, pages]
        self.predicted: Optional[_torch.Tensor] = None          # [pages] for the ATTENTION report


class PagedAttention:
    """The offloaded KV of one sequence (batch size 1) of a model with ``model.layers`` layers.

    ``start(keys, values, tokens, observed_mass)`` takes the KV of a prefilled prompt (per layer
    ``[kv_heads, n, head_dim]``, keys after RoPE), stores every whole page before the window in
    kvtierd, and keeps the rest resident. Then, per decode step and layer, ``append`` adds the
    new token's KV and ``attend`` computes its attention output; ``end_step`` after the last
    layer releases the step's pages and reports the attention expected next. ``tokens`` are the
    sequence's token ids: pages are keyed by them in kvtierd, as every other client keys them.
    """

    def __init__(self, client: Client, model: ModelSpec, plan: OffloadPlan, *, query_heads: int, dtype=None, device=None,
                 report_attention: bool = True):
        if model.page_tokens != plan.page_tokens:
            raise ValueError(f"the plan pages {plan.page_tokens} tokens, model {model.name!r} {model.page_tokens}: "
                             "register the model with the plan's page size")
        if query_heads % model.kv_heads:
            raise ValueError(f"{query_heads} query heads do not share {model.kv_heads} KV heads evenly")
        self.client, self.model, self.plan = client, model, plan
        registered = client._registered(model).page_tokens
        if registered != plan.page_tokens:
            raise ValueError(f"kvtierd pages model {model.name!r} in {registered} tokens, the plan in {plan.page_tokens}")
        self.groups = query_heads // model.kv_heads
        self.dtype = dtype if dtype is not None else torch_dtype(model)
        self.device = _torch.device(device) if device is not None else _torch.device("cpu")
        self.report = report_attention
        self.layers: List[_Layer] = []
        self.tokens: List[int] = []
        self.window_start = 0     # first token of the window (a page boundary)
        self.stats = OffloadStats()
        self._leases: List[PageLease] = []
        self._step_pages: Dict[int, _torch.Tensor] = {}   # page -> [layers, 2, P, H, D] (spec dtype, host)
        self._step_fetched = 0
        self.last_fetch: List[Optional[_torch.Tensor]] = []  # per layer: page ids [H, F] of the last step (-1: none)

    # ------------------------------------------------------------------ setup

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def cold_pages(self) -> range:
        """Pages kvtierd holds that are neither sinks nor in the window."""
        return range(self.plan.sink_pages, self.window_start // self.plan.page_tokens)

    def start(self, keys: Sequence, values: Sequence, tokens, observed_mass: Optional[Sequence] = None) -> None:
        """Offloads a prefilled prompt. ``keys``/``values``: per layer ``[kv_heads, n, head_dim]``;
        ``observed_mass``: per layer ``[kv_heads, pages]`` attention mass the prompt's last token
        gave each page (whole pages first; seeds promotion), or None."""
        if self.layers:
            raise ValueError("start takes a prompt once; make a new cache per sequence")
        plan, p = self.plan, self.plan.page_tokens
        tokens = [int(t) for t in tokens]
        n = len(tokens)
        if len(keys) != self.model.layers or len(values) != self.model.layers:
            raise ValueError(f"KV of {len(keys)} layers for a model of {self.model.layers}")
        if any(k.shape[1] != n for k in keys):
            raise ValueError(f"KV holds {keys[0].shape[1]} tokens but {n} token ids were given")
        self.tokens = tokens
        # The window: at least window_tokens recent tokens from a page boundary. A prompt too short
        # to leave the sink pages out of it is all window (its first pages become sinks later).
        self.window_start = max(0, n - plan.window_tokens) // p * p
        if self.window_start < plan.sink_pages * p:
            self.window_start = 0
        sink_end = min(plan.sink_pages * p, self.window_start)
        heads, dim = self.model.kv_heads, self.model.head_dim
        for index in range(self.model.layers):
            layer = _Layer(heads, dim, plan, self.dtype, self.device)
            k = keys[index].to(self.device, self.dtype)
            v = values[index].to(self.device, self.dtype)
            layer.sink_k, layer.sink_v = k[:, :sink_end].contiguous(), v[:, :sink_end].contiguous()
            layer.win_k, layer.win_v = k[:, self.window_start:].contiguous(), v[:, self.window_start:].contiguous()
            self._summarize(layer, k[:, :self.window_start])
            if observed_mass is not None:
                seen = _torch.as_tensor(observed_mass[index], dtype=_torch.float32, device=self.device)[:, :n // p]
                self._ensure_mass(layer, seen.shape[1])
                layer.mass[:, :seen.shape[1]] = seen
            self.layers.append(layer)
            self.last_fetch.append(None)
            if plan.promoted_pages:
                self._seed_promotions(layer, k, v)
        if self.window_start:
            self._put(self.window_start, lambda index, a, b: (keys[index][:, a:b], values[index][:, a:b]))
        if observed_mass is not None and plan.fetch_pages:
            # Where the prompt's last token looked: what the first step will likely fetch. If the
            # pages were stored already (an earlier turn) and went to disk, kvtierd reads them now.
            cold = self.cold_pages
            for layer in self.layers:
                seen = layer.mass[:, cold.start:cold.stop]
                layer.predicted = seen.mean(0) / seen.mean(0).sum().clamp(min=1e-9) if len(cold) else None
            self._report()

    def _summarize(self, layer: _Layer, keys) -> None:
        """Appends the key bounds of the whole pages of ``keys`` ([H, n, D], n a page multiple)."""
        p = self.plan.page_tokens
        h, n, d = keys.shape
        if n == 0:
            return
        pages = keys.float().reshape(h, n // p, p, d)
        layer.kmin = _torch.cat([layer.kmin, pages.amin(2)], 1)
        layer.kmax = _torch.cat([layer.kmax, pages.amax(2)], 1)

    def _ensure_mass(self, layer: _Layer, pages: int) -> None:
        """Moving averages for at least ``pages`` pages (window pages get theirs as they fill)."""
        have = layer.mass.shape[1]
        if pages > have:
            layer.mass = _torch.cat([layer.mass, _torch.zeros(layer.mass.shape[0], pages - have, device=self.device)], 1)

    def _seed_promotions(self, layer: _Layer, k, v) -> None:
        """Promotes, per head, the cold pages the prompt's last token attended to most (at least
        ``promote_mass``), up to the promoted slots."""
        cold = self.cold_pages
        if not len(cold):
            return
        p, m = self.plan.page_tokens, self.plan.promoted_pages
        mass = layer.mass[:, cold.start:cold.stop]
        best, order = mass.topk(min(m, mass.shape[1]), dim=1)
        for h in range(mass.shape[0]):
            for slot, (value, page) in enumerate(zip(best[h].tolist(), order[h].tolist())):
                if value < self.plan.promote_mass:
                    break
                page += cold.start
                layer.prom_ids[h, slot] = page
                layer.prom_k[h, slot] = k[h, page * p:(page + 1) * p]
                layer.prom_v[h, slot] = v[h, page * p:(page + 1) * p]
                self.stats.promotions += 1

    def _put(self, end: int, kv) -> None:
        """Stores the sequence up to token ``end`` (a page boundary) in kvtierd; the daemon asks
        only for what it lacks, through ``kv(layer, a, b)`` → keys and values ``[H, b - a, D]``."""
        want = torch_dtype(self.model)

        def fill(a: int, b: int, dest: np.ndarray) -> None:
            out = _host_tensor(dest, self.model)
            for index in range(self.model.layers):
                k, v = kv(index, a, b)
                out[index, 0].copy_(k.transpose(0, 1).to(want))
                out[index, 1].copy_(v.transpose(0, 1).to(want))

        put = self.client.put_pages(self.model, self.tokens[:end], fill)
        if put.cached_tokens < end:
            raise RuntimeError(f"kvtierd holds {put.cached_tokens} tokens of the sequence after a put of {end}: "
                               "is its RAM budget or the tenant's quota too small for the offloaded pages?")
        self.stats.pages_offloaded += put.new_pages

    # ------------------------------------------------------------------ a decode step

    def append(self, index: int, key, value) -> None:
        """Adds one new token's KV (``[kv_heads, 1, head_dim]``) to layer ``index``'s window.
        Call with layer 0 first: that is when ``token`` joins the sequence and the window gives
        up its oldest page once it holds a page more than it needs."""
        layer = self.layers[index]
        layer.win_k = _torch.cat([layer.win_k, key.to(self.device, self.dtype)], 1)
        layer.win_v = _torch.cat([layer.win_v, value.to(self.device, self.dtype)], 1)

    def add_token(self, token: int) -> None:
        """The token whose KV the layers' next ``append`` brings; first moves a page out of the
        window if it has one too many (it goes to kvtierd and gets a summary)."""
        p = self.plan.page_tokens
        if self.layers and self.layers[0].win_k.shape[1] >= self.plan.window_tokens + p - 1:
            self._retire_window_page()
        self.tokens.append(int(token))

    def _retire_window_page(self) -> None:
        p = self.plan.page_tokens
        start = self.window_start
        page = start // p
        keys = [layer.win_k[:, :p] for layer in self.layers]
        values = [layer.win_v[:, :p] for layer in self.layers]
        # Everything before `start` is in kvtierd already: only this page is asked for.
        self._put(start + p, lambda index, a, b: (keys[index][:, a - start:b - start], values[index][:, a - start:b - start]))
        for layer, k, v in zip(self.layers, keys, values):
            self._summarize(layer, k)
            self._ensure_mass(layer, page + 1)
            layer.win_k, layer.win_v = layer.win_k[:, p:].contiguous(), layer.win_v[:, p:].contiguous()
            if page < self.plan.sink_pages:
                layer.sink_k = _torch.cat([layer.sink_k, k], 1)
                layer.sink_v = _torch.cat([layer.sink_v, v], 1)
            elif self.plan.promoted_pages:
                self._offer(layer, page, layer.mass[:, page], k, v)
        self.window_start += p

    def attend(self, index: int, query, scaling: float):
        """Attention output of the newest token at layer ``index``: ``query`` ``[query_heads,
        head_dim]`` (after RoPE) → ``[query_heads, head_dim]``."""
        plan, p = self.plan, self.plan.page_tokens
        layer = self.layers[index]
        heads, dim = self.model.kv_heads, self.model.head_dim
        q = query.to(self.device, self.dtype).reshape(heads, self.groups, dim)
        cold = self.cold_pages
        parts_k, parts_v, biases = [layer.sink_k], [layer.sink_v], [self._zeros(layer.sink_k.shape[1])]
        m = plan.promoted_pages
        if m:
            parts_k.append(layer.prom_k.reshape(heads, m * p, dim))
            parts_v.append(layer.prom_v.reshape(heads, m * p, dim))
            biases.append(self._slot_bias(layer.prom_ids))
        fetch_ids = fk = fv = None
        dense = index < plan.dense_layers
        if plan.fetch_pages or dense:
            bound = self._bounds(layer, q, scaling)                       # [H, pages]
            if len(cold):
                if dense:
                    fetch_ids = self._choose(layer, bound, cold, len(cold))
                else:
                    # A promoted slot nobody holds lends its page to fetching: the budget is spent.
                    spare = (layer.prom_ids < 0).sum(1)
                    fetch_ids = self._choose(layer, bound, cold, plan.fetch_pages + int(spare.max()) if len(spare) else plan.fetch_pages,
                                             per_head=plan.fetch_pages + spare if len(spare) else None)   # [H, F], -1: none
                fk, fv = self._fetched(index, fetch_ids)
                parts_k.append(fk.reshape(heads, -1, dim))
                parts_v.append(fv.reshape(heads, -1, dim))
                biases.append(self._slot_bias(fetch_ids))
            self._predict(layer, bound, cold)
        self.last_fetch[index] = fetch_ids
        parts_k.append(layer.win_k)
        parts_v.append(layer.win_v)
        biases.append(self._zeros(layer.win_k.shape[1]))
        keys, values, bias = _torch.cat(parts_k, 1), _torch.cat(parts_v, 1), _torch.cat(biases, 1)
        logits = _torch.einsum("hgd,htd->hgt", q.float(), keys.float()) * scaling + bias[:, None, :]
        probs = _torch.softmax(logits, dim=-1)
        out = _torch.einsum("hgt,htd->hgd", probs, values.float()).to(self.dtype)
        attended = int((bias[0] == 0).sum())
        if not dense:
            self.stats.attended_tokens_max = max(self.stats.attended_tokens_max, attended)
        self.stats.attended_tokens_sum += attended
        self.stats.attended_layer_steps += 1
        self._observe(layer, probs.mean(1), fetch_ids, fk, fv)
        return out.reshape(heads * self.groups, dim)

    def end_step(self) -> None:
        """After the last layer: releases the pages this step leased and reports the attention the
        summaries expect at the next step, so kvtierd can read those pages from disk meanwhile."""
        self._release_leases()
        self.stats.steps += 1
        self.stats.fetched_by_step.append(self._step_fetched)
        self._step_fetched = 0
        self._report()

    def _report(self) -> None:
        """Sends kvtierd the attention the layers expect at the next step, per cold page."""
        cold = self.cold_pages
        if self.report and len(cold) and self.layers[0].predicted is not None:
            mass = _torch.zeros(cold.stop, dtype=_torch.float32)
            for layer in self.layers:
                if layer.predicted is not None:
                    mass[cold.start:cold.stop] += layer.predicted.cpu()
            mass /= len(self.layers)
            self.client.report_attention(self.model, self.tokens[:cold.stop * self.plan.page_tokens], mass.numpy())

    # ------------------------------------------------------------------ internals

    def _zeros(self, n: int):
        return _torch.zeros(self.model.kv_heads, n, dtype=_torch.float32, device=self.device)

    def _slot_bias(self, ids):
        """0 for the tokens of filled slots, -inf for empty ones: ``ids`` [H, slots] → [H, slots * P]."""
        bias = _torch.where(ids >= 0, 0.0, -math.inf).to(_torch.float32)
        return bias.repeat_interleave(self.plan.page_tokens, dim=1)

    def _bounds(self, layer: _Layer, q, scaling: float):
        """Per head and page, an upper bound of the scaled score any query of the head's group gives
        a key of the page: sum over channels of max(q * min, q * max)."""
        qf = q.float()
        upper = _torch.einsum("hgd,hpd->hgp", qf.clamp(min=0), layer.kmax) + _torch.einsum("hgd,hpd->hgp", qf.clamp(max=0), layer.kmin)
        return upper.amax(1) * scaling

    def _choose(self, layer: _Layer, bound, cold: range, f: int, per_head=None):
        """The ``f`` cold pages per head with the highest bounds, promoted ones excepted (with
        ``per_head``, a tensor [H], only that many for each head; -1 fills the rest)."""
        scores = _torch.full_like(bound, -math.inf)
        scores[:, cold.start:cold.stop] = bound[:, cold.start:cold.stop]
        promoted = layer.prom_ids
        if promoted.numel():
            rows = _torch.arange(promoted.shape[0], device=self.device)[:, None].expand_as(promoted)
            keep = promoted >= 0
            scores[rows[keep], promoted[keep]] = -math.inf
        k = min(f, scores.shape[1])
        best, ids = scores.topk(k, dim=1)
        ids = _torch.where(_torch.isfinite(best), ids, _torch.full_like(ids, -1))
        if k < f:
            ids = _torch.cat([ids, _torch.full((ids.shape[0], f - k), -1, dtype=ids.dtype, device=ids.device)], 1)
        if per_head is not None:
            column = _torch.arange(f, device=self.device)[None, :]
            ids = _torch.where(column < per_head[:, None], ids, _torch.full_like(ids, -1))
        return ids

    def _predict(self, layer: _Layer, bound, cold: range) -> None:
        """Where the summaries expect this head's attention among cold pages: a softmax of the
        bounds, averaged over heads (what ``end_step`` reports)."""
        if not len(cold):
            layer.predicted = None
            return
        layer.predicted = _torch.softmax(bound[:, cold.start:cold.stop], dim=1).mean(0)

    def _fetched(self, index: int, ids):
        """Keys and values ``[H, F, P, D]`` of the pages ``ids`` names (from this step's leases,
        leasing the pages no earlier layer of the step needed)."""
        wanted_ids = _torch.unique(ids[ids >= 0])          # sorted
        wanted = wanted_ids.tolist()
        missing = [page for page in wanted if page not in self._step_pages]
        if missing and not self._lease(missing):
            # The tenant's RAM quota cannot hold this step's leases and these pages: let the
            # earlier layers' pages go (they were copied already) and ask for this layer's alone.
            self._release_leases()
            if not self._lease(wanted):
                raise RuntimeError(f"kvtierd served fewer than the {len(wanted)} offloaded pages one layer needs: were they "
                                   "deleted, or is the tenant's RAM quota (tenantRAMQuota) smaller than one step's pages?")
        heads = ids.shape[0]
        p, dim = self.plan.page_tokens, self.model.head_dim
        if not wanted:
            z = _torch.zeros(heads, ids.shape[1], p, dim, dtype=self.dtype, device=self.device)
            return z, z
        stacked = _torch.stack([self._step_pages[page][index] for page in wanted])   # [U, 2, P, H, D], host
        stacked = stacked.to(self.device, non_blocking=True).to(self.dtype)
        position = _torch.zeros(wanted[-1] + 1, dtype=_torch.long, device=self.device)
        position[wanted_ids] = _torch.arange(len(wanted), device=self.device)
        u = position[ids.clamp(min=0)]                      # [H, F]: each page's place in `stacked`
        h = _torch.arange(heads, device=self.device)[:, None]
        keys = stacked[:, 0][u, :, h, :]                    # [H, F, P, D]
        values = stacked[:, 1][u, :, h, :]
        self.stats.pages_fetched += int((ids >= 0).sum())
        return keys, values

    def _lease(self, pages: List[int]) -> bool:
        """Leases ``pages`` for the rest of the step; False (and nothing held) when kvtierd served
        fewer."""
        p = self.plan.page_tokens
        self.stats.lease_requests += 1
        try:
            lease = self.client.lease_pages(self.model, self.tokens[:(pages[-1] + 1) * p], pages)
        except KVTierError as e:
            if e.code == "overBudget":  # the tenant's leases fill its RAM quota: not even one page
                return False
            raise
        if len(lease.pages) != len(pages):
            lease.release()
            return False
        self._leases.append(lease)
        for j, page in enumerate(lease.pages):
            self._step_pages[page] = _host_tensor(lease.page(j), self.model)
        self.stats.pages_leased += len(pages)
        self._step_fetched += len(pages)
        return True

    def _release_leases(self) -> None:
        self._step_pages.clear()
        for lease in self._leases:
            lease.release()
        self._leases.clear()

    def _observe(self, layer: _Layer, mass, fetch_ids, fk, fv) -> None:
        """Folds the mass each visible page got (``mass`` [H, tokens], in attend's order) into
        the moving averages, then demotes and promotes."""
        plan, p = self.plan, self.plan.page_tokens
        heads = mass.shape[0]
        at = layer.sink_k.shape[1]
        m = plan.promoted_pages
        rows = _torch.arange(heads, device=self.device)[:, None]
        seen_ids, seen_mass = [], []
        if m:
            seen_ids.append(layer.prom_ids)
            seen_mass.append(mass[:, at:at + m * p].reshape(heads, m, p).sum(2))
            at += m * p
        if fetch_ids is not None:
            f = fetch_ids.shape[1]
            seen_ids.append(fetch_ids)
            seen_mass.append(mass[:, at:at + f * p].reshape(heads, f, p).sum(2))
            at += f * p
        # Window pages: whole ones and the partial last one, page by page from window_start.
        win = mass[:, at:]
        n = win.shape[1]
        first = self.window_start // p
        whole = n // p
        if whole:
            self._ensure_mass(layer, first + whole)
            seen_ids.append(_torch.arange(first, first + whole, device=self.device)[None, :].expand(heads, whole))
            seen_mass.append(win[:, :whole * p].reshape(heads, whole, p).sum(2))
        if seen_ids:
            ids = _torch.cat(seen_ids, 1)
            got = _torch.cat(seen_mass, 1)
            valid = ids >= 0
            r = rows.expand_as(ids)[valid]
            i = ids[valid]
            layer.mass[r, i] = plan.decay * layer.mass[r, i] + (1 - plan.decay) * got[valid]
        if m:
            self._demote(layer)
            if fetch_ids is not None:
                self._promote_fetched(layer, fetch_ids, fk, fv)

    def _demote(self, layer: _Layer) -> None:
        ids = layer.prom_ids
        filled = ids >= 0
        if not bool(filled.any()):
            return
        rows = _torch.arange(ids.shape[0], device=self.device)[:, None].expand_as(ids)
        current = _torch.zeros_like(layer.prom_low, dtype=_torch.float32)
        current[filled] = layer.mass[rows[filled], ids[filled]]
        low = filled & (current < self.plan.demote_mass)
        layer.prom_low = _torch.where(low, layer.prom_low + 1, _torch.zeros_like(layer.prom_low))
        gone = layer.prom_low >= self.plan.patience
        if bool(gone.any()):
            self.stats.demotions += int(gone.sum())
            layer.prom_ids = _torch.where(gone, _torch.full_like(ids, -1), ids)
            layer.prom_low = _torch.where(gone, _torch.zeros_like(layer.prom_low), layer.prom_low)

    def _promote_fetched(self, layer: _Layer, fetch_ids, fk, fv) -> None:
        """Offers each head's best fetched page (by moving average) for promotion."""
        heads = fetch_ids.shape[0]
        rows = _torch.arange(heads, device=self.device)[:, None].expand_as(fetch_ids)
        avg = _torch.where(fetch_ids >= 0, layer.mass[rows, fetch_ids.clamp(min=0)], _torch.full_like(fetch_ids, -1, dtype=_torch.float32))
        best = avg.argmax(1)
        for h in range(heads):
            j = int(best[h])
            page = int(fetch_ids[h, j])
            if page >= 0:
                self._offer_head(layer, h, page, float(avg[h, j]), fk[h, j], fv[h, j])

    def _offer(self, layer: _Layer, page: int, mass, k, v) -> None:
        """Offers ``page`` (leaving the window: ``k``, ``v`` [H, P, D]) to each head's slots."""
        for h in range(k.shape[0]):
            self._offer_head(layer, h, page, float(mass[h]), k[h], v[h])

    def _offer_head(self, layer: _Layer, h: int, page: int, mass: float, k, v) -> None:
        """Promotes ``page`` for head ``h`` if its moving average passes ``promote_mass`` and a slot
        is free, or if it has ``swap_margin`` times the mass of the weakest promoted page (then
        that one is demoted: one swap per offer)."""
        plan = self.plan
        if mass < plan.promote_mass:
            return
        ids = layer.prom_ids[h]
        if bool((ids == page).any()):
            return
        free = (ids < 0).nonzero()
        if len(free):
            slot = int(free[0])
        else:
            current = layer.mass[h, ids]
            slot = int(current.argmin())
            if mass < plan.swap_margin * float(current[slot]):
                return
            self.stats.demotions += 1
        layer.prom_ids[h, slot] = page
        layer.prom_low[h, slot] = 0
        layer.prom_k[h, slot] = k.to(self.dtype)
        layer.prom_v[h, slot] = v.to(self.dtype)
        self.stats.promotions += 1


def _host_tensor(page: np.ndarray, model: ModelSpec):
    """A tensor of the model's dtype over ``page``'s memory (uint16 bit patterns, as kvtierd's
    pages and put buffers hold them), without a copy. A read-only page (a view of the daemon's
    arena) gives a tensor that must not be written."""
    bits = page.view(np.int16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the arena view is read-only
        t = _torch.from_numpy(bits)
    return t.view(torch_dtype(model))


__all__ = ["MODES", "OffloadPlan", "OffloadStats", "PagedAttention"]
