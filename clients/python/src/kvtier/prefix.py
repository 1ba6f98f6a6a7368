"""A conversation's KV through kvtierd, turn after turn: restore the cached prefix, write back
what the turn added. NumPy only; ``kvtier.transformers.KVTierCache`` is this plus tensors.

    cache = kvtier.PrefixCache(client, model)
    keys, values = cache.restore(tokens)      # [layers, n, kv_heads, head_dim], n < len(tokens)
    # ... compute tokens[n:] attending to the restored KV, producing KV for all of tokens ...
    cache.save(tokens, all_keys, all_values)  # the daemon stores only pages it lacks
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Tuple

import numpy as np

from .client import Client, LookupResult, PutResult
from .model import ModelSpec


class PrefixCache:
    """Restores the longest cached prefix of a token list and writes a turn's KV back.

    Keys are the ones attention uses (after RoPE for Llama-style models), in the layout
    ``[layers, tokens, kv_heads, head_dim]``. ``restore`` always leaves at least one token to
    compute, because the next token's logits come from the last prompt token's forward pass.
    ``save`` sends the full token list; the client sends only what lies past the cached prefix
    and the daemon completes a partial last page, so each turn costs only its new tokens.

    ``durable=True`` makes ``save`` return only once the pages are on disk: kvtierd keeps
    non-durable pages in RAM and drops them at shutdown, so a conversation that must outlive a
    daemon restart needs it.
    """

    def __init__(self, client: Client, model: ModelSpec, *, durable: bool = False):
        self.client = client
        self.model = model
        self.durable = durable
        self.last_lookup: Optional[LookupResult] = None
        self.last_put: Optional[PutResult] = None
        self.restore_seconds = 0.0

    def restore(self, tokens, fetch: Optional[Callable] = None) -> Tuple:
        """The KV of the longest cached prefix of ``tokens``, at most ``len(tokens) - 1`` tokens.

        Returns ``(keys, values)`` of ``model.numpy_dtype``, ``[layers, n, kv_heads, head_dim]``;
        ``n`` is 0 when nothing is cached. ``last_lookup`` tells how the prefix split over the
        daemon's RAM and disk tiers, ``restore_seconds`` how long lookup plus get took.

        ``fetch(tokens, most)``, when given, gets the prefix instead of ``Client.get`` (and its
        result is returned as it is), e.g. ``kvtier.torch.get_tensors`` into a GPU; it is not
        called when nothing is cached.
        """
        start = time.perf_counter()
        tokens = np.asarray(tokens, dtype=np.int64).ravel()
        self.last_lookup = self.client.lookup_detail(self.model, tokens)
        most = min(self.last_lookup.cached_tokens, len(tokens) - 1)
        if most <= 0:
            shape = self.model.shape.kv_shape(0)
            keys = np.empty(shape, dtype=self.model.numpy_dtype)
            values = np.empty(shape, dtype=self.model.numpy_dtype)
        else:
            # The daemon may serve fewer tokens than LOOKUP promised (pages evicted in between,
            # or the inline reply limit): what comes back is what counts.
            fetch = fetch or (lambda toks, n: self.client.get(self.model, toks, max_tokens=n))
            keys, values = fetch(tokens, most)
        self.restore_seconds = time.perf_counter() - start
        return keys, values

    def save(self, tokens, keys, values) -> int:
        """Stores the KV of ``tokens`` (``[layers, len(tokens), kv_heads, head_dim]``) and returns
        the tokens cached after it. Float arrays are rounded to the model's float16; a bfloat16
        model takes bit patterns as ``Client.put`` does."""
        keys, values = self._stored_dtype(keys), self._stored_dtype(values)
        self.last_put = self.client.put_detail(self.model, tokens, keys, values, durable=self.durable)
        return self.last_put.cached_tokens

    def _stored_dtype(self, arr):
        arr = np.asarray(arr)
        if self.model.dtype == "float16" and arr.dtype.kind == "f" and arr.dtype != np.float16:
            return arr.astype(np.float16)
        return arr
