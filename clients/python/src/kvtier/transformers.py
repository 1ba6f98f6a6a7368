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
"""

from __future__ import annotations

import numpy as np

try:
    import torch as _torch
    from transformers import DynamicCache
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("kvtier.transformers needs PyTorch and Transformers >= 4.56: "
                      "pip install torch 'transformers>=4.56' (kvtier itself needs only NumPy)") from e

from .client import Client
from .model import ModelSpec
from .prefix import PrefixCache
from .torch import from_numpy, to_numpy, torch_dtype

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
    """

    def __init__(self, client: Client, model: ModelSpec, *, dtype=None, device=None, durable: bool = False,
                 config=None):
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

    def restore(self, tokens) -> int:
        """Loads the KV of the longest cached prefix of ``tokens`` (leaving at least the last token
        to compute) into this empty cache and returns how many tokens it covers. Run the model
        on ``tokens[n:]`` next (``generate`` skips the cached tokens by itself)."""
        if self.get_seq_length() != 0:
            raise ValueError("restore needs an empty cache: make a new KVTierCache per conversation")
        keys, values = self.kvtier.restore(_token_list(tokens))
        n = keys.shape[1]
        if n:
            # [layers, n, kv_heads, head_dim] -> per layer [1, kv_heads, n, head_dim]
            k = from_numpy(keys, self.spec).to(self.tensor_device, self.tensor_dtype).permute(0, 2, 1, 3)
            v = from_numpy(values, self.spec).to(self.tensor_device, self.tensor_dtype).permute(0, 2, 1, 3)
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
        k = to_numpy("keys", _torch.stack(keys), self.spec)
        v = to_numpy("values", _torch.stack(values), self.spec)
        return self.kvtier.save(tokens[:n], k, v)


def _token_list(tokens) -> np.ndarray:
    if isinstance(tokens, _torch.Tensor):
        if tokens.dim() == 2:
            if tokens.shape[0] != 1:
                raise ValueError(f"KVTierCache holds one sequence; got token ids of batch size {tokens.shape[0]}")
            tokens = tokens[0]
        return tokens.detach().cpu().numpy().astype(np.int64)
    return np.asarray(tokens, dtype=np.int64).ravel()


__all__ = ["KVTierCache"]
