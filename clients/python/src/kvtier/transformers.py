"""A Transformers cache whose prefix comes from kvtierd and whose new KV goes back to it.

Targets the layered cache API of Transformers 4.56 and later (``DynamicCache.layers[i].keys``),
including 5.x; tested with 4.56.2, 4.57.6 and 5.23.0. Needs ``torch`` and ``transformers``, neither of which
``kvtier`` depends on; import it as ``from kvtier.transformers import KVTierCache``.

    cache = KVTierCache(client, spec, dtype=model.dtype, device=model.device)
    restored = cache.restore(prompt_ids)          # tokens whose KV came from kvtierd
    out = model.generate(torch.tensor([prompt_ids]), past_key_values=cache, max_new_tokens=64)
    cache.save(out[0].tolist())                   # writes back what this turn computed

One sequence per cache (batch size 1), full-attention layers only: a sliding-window layer keeps
only its window, so there would be nothing whole to store.

``OffloadedCache`` keeps only part of a long context resident while decoding and fetches the
rest from kvtierd as attention needs it (``kvtier.offload``; docs/attention-offload.md):

    enable_offload(model)                          # its attention, and token ids for the cache
    plan = OffloadPlan.for_budget(1024, page_tokens=32)
    cache = OffloadedCache(client, spec, plan, query_heads=model.config.num_attention_heads)
    out = model.generate(torch.tensor([prompt_ids]), past_key_values=cache, max_new_tokens=64)
"""

from __future__ import annotations

import logging
import threading

import numpy as np

try:
    import torch as _torch
    from transformers import DynamicCache
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("kvtier.transformers needs PyTorch and Transformers >= 4.56: "
                      "pip install torch 'transformers>=4.56' (kvtier itself needs only NumPy)") from e

from .client import Client
from .errors import KVTierError
from .model import ModelSpec
from .offload import OffloadPlan, PagedAttention
from .prefix import PrefixCache
from .torch import get_tensors, to_numpy, torch_dtype
from .vram import VramError, same_device

if not hasattr(DynamicCache(), "layers"):  # pragma: no cover - depends on the environment
    raise ImportError("kvtier.transformers needs Transformers >= 4.56 (the layered Cache API): "
                      "pip install -U 'transformers>=4.56'")


class KVTierCache(DynamicCache):
    """A ``DynamicCache`` that restores a conversation's prefix from kvtierd and writes the KV
    a turn computed back to it.

    ``model`` is the ``kvtier.ModelSpec`` of the network's KV (layers, KV heads, head dim, and
    the dtype kvtierd stores, float16 or bfloat16). ``dtype`` and ``device`` are those of the
    tensors the network's attention uses (default: the spec's dtype, CPU). ``durable=True``:
    ``save`` returns once the pages are on disk (they then survive a daemon restart). ``config``
    is passed on to ``DynamicCache``.

    ``vram`` (a ``kvtier.vram.VramTier``) adds the VRAM tier: ``restore`` copies the prefix
    device to device when a pool of the tenant holds all of it (``restored_from`` says which
    tier served), and with a pool of its own on this cache's device, ``save`` and restores
    from RAM or disk also place the pages there for the next process.
    """

    def __init__(self, client: Client, model: ModelSpec, *, dtype=None, device=None, durable: bool = False,
                 config=None, vram=None):
        if config is None:
            super().__init__()
        else:
            super().__init__(config=config)
        if any(getattr(layer, "is_sliding", False) for layer in self.layers):
            raise ValueError("KVTierCache holds full-attention layers only: a sliding-window layer keeps just "
                             "its window, which cannot be stored as a prefix")
        self.kvtier = PrefixCache(client, model, durable=durable)
        self.spec = model
        self.tensor_dtype = dtype if dtype is not None else torch_dtype(model)
        self.tensor_device = _torch.device(device) if device is not None else _torch.device("cpu")
        self.restored_tokens = 0
        self.vram = vram
        #: "vram", "daemon" (RAM or disk through the page arena) or None: where the last restore's KV came from.
        self.restored_from = None

    def _fetch(self, tokens, most: int):
        lookup = self.kvtier.last_lookup
        if self.vram is not None and lookup.vram_tokens >= most:
            try:
                kv = self.vram.restore(self.spec, tokens, device=self.tensor_device, max_tokens=most, min_tokens=most)
            except (VramError, KVTierError, OSError) as e:  # pool on another GPU, gone, unmappable: RAM and disk serve
                log.warning("kvtier: VRAM tier restore failed, restoring from kvtierd instead: %s", e)
                kv = None
            if kv is not None:
                self.restored_from = "vram"
                return kv
        # Straight into the device (pinned arena on CUDA).
        keys, values = get_tensors(self.kvtier.client, self.spec, tokens, max_tokens=most, device=self.tensor_device)
        self.restored_from = "daemon"
        self._place(tokens, keys, values)
        return keys, values

    def _place(self, tokens, keys, values) -> None:
        """Copies the pages of ``tokens`` the VRAM pool lacks into it, when this cache has a pool
        on its own device."""
        pool = self.vram.pool if self.vram is not None else None
        if pool is None or not same_device(pool.device, self.tensor_device) or keys.shape[1] == 0:
            return
        try:
            self.vram.place(self.spec, tokens[:keys.shape[1]], keys, values)
        except (VramError, KVTierError, OSError) as e:  # the pool is an extra: the store already holds the pages
            log.warning("kvtier: placing pages in the VRAM pool failed: %s", e)

    def restore(self, tokens) -> int:
        """Loads the KV of the longest cached prefix of ``tokens`` (leaving at least the last token
        to compute) into this empty cache and returns how many tokens it covers. Run the model
        on ``tokens[n:]`` next (``generate`` skips the cached tokens by itself)."""
        if self.get_seq_length() != 0:
            raise ValueError("restore needs an empty cache: make a new KVTierCache per conversation")
        self.restored_from = None
        keys, values = self.kvtier.restore(_token_list(tokens), fetch=self._fetch)
        n = keys.shape[1]
        if n:
            # [layers, n, kv_heads, head_dim] -> per layer [1, kv_heads, n, head_dim]
            k = keys.to(self.tensor_dtype).permute(0, 2, 1, 3)
            v = values.to(self.tensor_dtype).permute(0, 2, 1, 3)
            for layer in range(self.spec.layers):
                self.update(k[layer].unsqueeze(0).contiguous(), v[layer].unsqueeze(0).contiguous(), layer)
        self.restored_tokens = n
        return n

    def save(self, tokens) -> int:
        """Stores the KV this cache holds for the leading tokens of ``tokens`` (the prompt plus what
        was generated; the last generated token has no KV yet and is left out) and returns how many
        tokens kvtierd holds after it. Only pages the daemon lacks are sent."""
        tokens = _token_list(tokens)
        n = self.get_seq_length()
        if n == 0:
            return 0
        if len(tokens) < n:
            raise ValueError(f"the cache holds KV for {n} tokens but only {len(tokens)} token ids were given")
        if len(self.layers) != self.spec.layers:
            raise ValueError(f"the cache has {len(self.layers)} layers; model {self.spec.name!r} has {self.spec.layers}")
        want = torch_dtype(self.spec)
        keys, values = [], []
        for layer in self.layers:
            if layer.keys.shape[0] != 1:
                raise ValueError(f"KVTierCache holds one sequence; this one has batch size {layer.keys.shape[0]}")
            keys.append(layer.keys[0, :, :n].transpose(0, 1).to(want))
            values.append(layer.values[0, :, :n].transpose(0, 1).to(want))
        keys, values = _torch.stack(keys), _torch.stack(values)
        cached = self.kvtier.save(tokens[:n], to_numpy("keys", keys, self.spec), to_numpy("values", values, self.spec))
        self._place(tokens[:n], keys, values)
        return cached


def _token_list(tokens) -> np.ndarray:
    if isinstance(tokens, _torch.Tensor):
        if tokens.dim() == 2:
            if tokens.shape[0] != 1:
                raise ValueError(f"KVTierCache holds one sequence; got token ids of batch size {tokens.shape[0]}")
            tokens = tokens[0]
        return tokens.detach().cpu().numpy().astype(np.int64)
    return np.asarray(tokens, dtype=np.int64).ravel()


log = logging.getLogger("kvtier")

OFFLOAD_ATTENTION = "kvtier_offload"
_ids = threading.local()


def enable_offload(model):
    """Makes ``model`` (a Transformers causal LM) able to run with an ``OffloadedCache``: its
    attention becomes ``"kvtier_offload"`` (SDPA whenever the cache is not an offloaded one, so
    other caches work as before), and a hook on its input embeddings hands each forward's token
    ids to the cache, which keys pages by them. Returns ``model``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(OFFLOAD_ATTENTION, _attention)
    AttentionMaskInterface.register(OFFLOAD_ATTENTION, sdpa_mask)
    model.config._attn_implementation = OFFLOAD_ATTENTION
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = OFFLOAD_ATTENTION
    embeddings = model.get_input_embeddings()
    if not getattr(embeddings, "_kvtier_ids_hook", False):
        embeddings.register_forward_pre_hook(_record_ids)
        embeddings._kvtier_ids_hook = True
    return model


def _record_ids(module, args):
    if args and isinstance(args[0], _torch.Tensor):
        _ids.value = args[0]


def _take_ids(count: int):
    ids = getattr(_ids, "value", None)
    _ids.value = None
    if ids is None:
        raise ValueError("OffloadedCache needs the token ids of each forward: call kvtier.transformers.enable_offload(model) "
                         "first, and pass input_ids (not inputs_embeds)")
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] != count:
        raise ValueError(f"OffloadedCache holds one sequence; this forward's input ids have shape {tuple(ids.shape)} "
                         f"for {count} new tokens")
    return ids[0].tolist()


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The ``kvtier_offload`` attention: an offloaded cache's paged attention for a decode step,
    SDPA otherwise (a prompt's forward also records where its last token's attention went)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    marker = getattr(key, "_kvtier_offload", None)
    if marker is not None:
        cache, layer = marker
        if query.shape[0] != 1 or query.shape[2] != 1:
            raise ValueError("an offloaded cache decodes one token of one sequence per forward")
        out = cache.paged.attend(layer, query[0, :, 0], scale)            # [Hq, D]
        if layer == len(cache.paged.layers) - 1:
            cache.paged.end_step()
        return out.to(query.dtype)[None, None], None                       # [1, 1, Hq, D]
    prompt = getattr(key, "_kvtier_prompt", None)
    if prompt is not None:
        prompt[0]._observe_prompt(prompt[1], query, key, scale)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


class OffloadedCache(DynamicCache):
    """A cache that prefills like ``DynamicCache`` and, from the first decode step on, keeps only
    what ``plan`` says resident (sinks, window, promoted pages) and fetches the cold pages each
    step needs from kvtierd (``kvtier.offload.PagedAttention``, which ``paged`` is once started).

    The model must be prepared with ``enable_offload(model)``. ``model`` is the ``ModelSpec`` of
    the network's KV with ``page_tokens`` equal to the plan's; ``query_heads`` the network's
    attention heads; ``dtype`` and ``device`` those of its attention tensors (default: the
    spec's dtype, CPU). One sequence per cache; decode feeds one token per forward.
    """

    def __init__(self, client: Client, model: ModelSpec, plan: OffloadPlan, *, query_heads: int, dtype=None, device=None,
                 report_attention: bool = True, config=None):
        if config is None:
            super().__init__()
        else:
            super().__init__(config=config)
        if any(getattr(layer, "is_sliding", False) for layer in self.layers):
            raise ValueError("OffloadedCache holds full-attention layers only")
        self.spec = model
        self.plan = plan
        self.paged: PagedAttention = None
        self._paged_args = dict(query_heads=query_heads, dtype=dtype, device=device, report_attention=report_attention)
        self._client = client
        self._tokens = []
        self._prompt_mass = {}

    def fork(self, plan: OffloadPlan = None, *, report_attention: bool = None) -> "OffloadedCache":
        """A new cache over this one's prompt, before its first decode step, with ``plan`` (default:
        this one's) and ``report_attention`` (default: this one's): one prefill, several policies,
        as the benchmarks compare them."""
        if self.paged is not None:
            raise ValueError("fork a cache before its first decode step: its prompt is offloaded after that")
        args = dict(self._paged_args)
        if report_attention is not None:
            args["report_attention"] = report_attention
        twin = OffloadedCache(self._client, self.spec, plan or self.plan, **args)
        for index, layer in enumerate(self.layers):
            if len(twin.layers) <= index:
                twin.layers.append(type(layer)())
            copy = twin.layers[index]
            copy.lazy_initialization(layer.keys, layer.values)
            copy.keys, copy.values = layer.keys.clone(), layer.values.clone()
        twin._tokens = list(self._tokens)
        twin._prompt_mass = {i: m.clone() for i, m in self._prompt_mass.items()}
        return twin

    @property
    def stats(self):
        """``kvtier.offload.OffloadStats`` of the decode steps so far (None before the first)."""
        return self.paged.stats if self.paged is not None else None

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.paged is None and not (key_states.shape[-2] == 1 and self.get_seq_length() > 0):
            if layer_idx == 0:
                self._tokens.extend(_take_ids(key_states.shape[-2]))
            keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            keys._kvtier_prompt = (self, layer_idx)
            return keys, values
        if key_states.shape[0] != 1 or key_states.shape[-2] != 1:
            raise ValueError("an offloaded cache decodes one token of one sequence per forward "
                             f"(got keys of shape {tuple(key_states.shape)})")
        if layer_idx == 0:
            token = _take_ids(1)[0]
            if self.paged is None:
                self._start()
            self.paged.add_token(token)
        self.paged.append(layer_idx, key_states[0], value_states[0])
        key_states._kvtier_offload = (self, layer_idx)
        return key_states, value_states

    def _start(self) -> None:
        """Hands the prefilled prompt to ``PagedAttention``, which offloads its cold pages, and
        drops the full copy."""
        self.paged = PagedAttention(self._client, self.spec, self.plan, **self._paged_args)
        keys = [layer.keys[0] for layer in self.layers]
        values = [layer.values[0] for layer in self.layers]
        masses = [self._prompt_mass.get(i) for i in range(len(self.layers))]
        self.paged.start(keys, values, self._tokens, None if any(m is None for m in masses) else masses)
        for layer in self.layers:
            layer.keys = layer.keys[:, :, :0]
            layer.values = layer.values[:, :, :0]
        self._prompt_mass.clear()

    def _observe_prompt(self, layer_idx: int, query, keys, scale: float) -> None:
        """Attention mass the prompt's last token gives each whole page, per KV head (seeds promotion)."""
        p = self.plan.page_tokens
        heads, n = keys.shape[1], keys.shape[2]
        q = query[0, :, -1].float().reshape(heads, -1, query.shape[-1])
        probs = _torch.softmax(_torch.einsum("hgd,htd->hgt", q, keys[0].float()) * scale, dim=-1).mean(1)
        whole = n // p
        self._prompt_mass[layer_idx] = probs[:, :whole * p].reshape(heads, whole, p).sum(2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.paged is not None:
            return self.paged.length
        return super().get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0):
        if self.paged is not None:
            return self.paged.length + query_length, 0
        return super().get_mask_sizes(query_length, layer_idx)

    def crop(self, tokens_to_remove: int) -> None:
        if self.paged is not None:
            raise NotImplementedError("an offloaded cache cannot be cropped: its pages are in kvtierd")
        super().crop(tokens_to_remove)

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("an offloaded cache holds one sequence: no beam search")


__all__ = ["KVTierCache", "OffloadedCache", "OffloadPlan", "enable_offload"]
