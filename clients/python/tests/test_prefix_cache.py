"""kvtier.PrefixCache against a real kvtierd: what restore leaves to compute and what save sends."""

from __future__ import annotations

import numpy as np

import kvtier

SPEC = kvtier.ModelSpec("prefix-cache", layers=2, kv_heads=2, head_dim=32, page_tokens=16)


def kv32(n, seed):
    rng = np.random.default_rng(seed)
    shape = (SPEC.layers, n, SPEC.kv_heads, SPEC.head_dim)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


def test_restore_and_save(daemon):
    tokens = list(range(5000, 5040))
    keys, values = kv32(40, seed=1)
    with kvtier.Client(daemon.socket) as client:
        cache = kvtier.PrefixCache(client, SPEC)
        k, v = cache.restore(tokens)
        assert k.shape == (2, 0, 2, 32) and k.dtype == np.float16 and cache.last_lookup.cached_tokens == 0

        # float32 is rounded to the model's float16; everything is sent the first time
        assert cache.save(tokens[:25], keys[:, :25], values[:, :25]) == 25
        assert cache.last_put.sent_tokens == 25
        # the next turn sends only its new tokens (completing the partial page 16..<25)
        assert cache.save(tokens, keys, values) == 40 and cache.last_put.sent_tokens == 15
        assert cache.save(tokens, keys, values) == 40 and cache.last_put.sent_tokens == 0

        # a fully cached prompt still leaves its last token to compute
        k, v = cache.restore(tokens)
        assert k.shape[1] == 39 and cache.last_lookup.cached_tokens == 40 and cache.restore_seconds > 0
        assert np.array_equal(k, keys[:, :39].astype(np.float16))
        assert np.array_equal(v, values[:, :39].astype(np.float16))
        # a longer prompt gets the whole cached prefix
        k, _ = cache.restore(tokens + [1, 2, 3])
        assert k.shape[1] == 40
        # a diverging prompt gets the common whole pages only
        k, _ = cache.restore(tokens[:20] + [7] * 20)
        assert k.shape[1] == 16
