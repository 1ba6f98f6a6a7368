"""kvtier.transformers.KVTierCache with a real (tiny, random-weight) LlamaForCausalLM on CPU.

Skipped without torch and transformers (scripts/install-deps installs both where a CPU torch
wheel is at hand). The NumPy path the cache is built on, ``kvtier.PrefixCache``, is tested with a
trained model in test_tinyllama_e2e.py.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch (scripts/install-deps installs a CPU wheel)")
transformers = pytest.importorskip("transformers", reason="needs transformers >= 4.56 (scripts/install-deps)")

import kvtier  # noqa: E402
from kvtier.transformers import KVTierCache  # noqa: E402

LAYERS, HEADS, KV_HEADS, HIDDEN = 2, 4, 2, 64
HEAD_DIM = HIDDEN // HEADS


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=128,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      num_key_value_heads=KV_HEADS, max_position_embeddings=512)
    return transformers.LlamaForCausalLM(config).eval()


def spec(dtype):
    return kvtier.ModelSpec(f"hf-tiny-llama-{dtype}", layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                            dtype=dtype, page_tokens=16)


def prompt(n, seed):
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def rounded_reference(model, tokens, prefix, dtype):
    """Logits of tokens[prefix:] after a recompute whose prefix KV went through ``dtype``."""
    cache = transformers.DynamicCache()
    model(torch.tensor([tokens[:prefix]]), past_key_values=cache, use_cache=True)
    for layer in cache.layers:
        layer.keys = layer.keys.to(dtype).to(torch.float32)
        layer.values = layer.values.to(dtype).to(torch.float32)
    return model(torch.tensor([tokens[prefix:]]), past_key_values=cache, use_cache=True).logits[0]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@torch.no_grad()
def test_two_turns_restore_and_write_back(daemon, model, dtype):
    turn1 = prompt(37, seed=1)              # not a multiple of the 16-token page
    turn2 = turn1 + prompt(21, seed=2)
    with kvtier.Client(daemon.socket) as client:
        cache = KVTierCache(client, spec(dtype), dtype=torch.float32)
        assert cache.restore(turn1) == 0
        model(torch.tensor([turn1]), past_key_values=cache, use_cache=True)
        assert cache.save(turn1) == 37 and cache.kvtier.last_put.sent_tokens == 37
        assert client.lookup(spec(dtype), turn2) == 37

        cache = KVTierCache(client, spec(dtype), dtype=torch.float32)
        assert cache.restore(turn2) == 37 and cache.get_seq_length() == 37
        logits = model(torch.tensor([turn2[37:]]), past_key_values=cache, use_cache=True).logits[0]
        reference = rounded_reference(model, turn2, 37, getattr(torch, dtype))
        assert torch.allclose(logits, reference, rtol=0, atol=1e-5), (logits - reference).abs().max()
        full = model(torch.tensor([turn2])).logits[0, 37:]
        assert torch.allclose(logits, full, rtol=0, atol=0.05)
        # Write back: only the 21 new tokens travel; the partial page 32..<37 is completed.
        assert cache.save(turn2) == len(turn2) and cache.kvtier.last_put.sent_tokens == 21
        keys, _ = client.get(spec(dtype), turn2)
        stored = keys if dtype == "float16" else keys.view(np.int16)
        want = cache.layers[1].keys[0, :, :].transpose(0, 1).to(getattr(torch, dtype))
        want = want.numpy() if dtype == "float16" else want.view(torch.int16).numpy()
        assert np.array_equal(stored[1], want)


@torch.no_grad()
def test_generate_continues_from_restored_prefix(daemon, model):
    tokens = prompt(50, seed=3)
    with kvtier.Client(daemon.socket) as client:
        first = KVTierCache(client, spec("float16"), dtype=torch.float32)
        first.restore(tokens)
        model(torch.tensor([tokens]), past_key_values=first, use_cache=True)
        first.save(tokens)

        cache = KVTierCache(client, spec("float16"), dtype=torch.float32)
        assert cache.restore(tokens) == 49  # the last prompt token is computed for its logits
        out = model.generate(torch.tensor([tokens]), attention_mask=torch.ones(1, 50, dtype=torch.long),
                             past_key_values=cache, max_new_tokens=6, do_sample=False)
        assert out.shape == (1, 56) and out[0, :50].tolist() == tokens
        # generate computed 50 - 49 + 5 tokens' KV; the 6th new token has none yet.
        assert cache.get_seq_length() == 55
        assert cache.save(out) == 55 and cache.kvtier.last_put.sent_tokens == 5
        assert client.lookup(spec("float16"), out[0].tolist()) == 55


def test_misuse_is_refused(daemon, model):
    tokens = prompt(20, seed=4)
    with kvtier.Client(daemon.socket) as client:
        cache = KVTierCache(client, spec("float16"), dtype=torch.float32)
        with torch.no_grad():
            model(torch.tensor([tokens, tokens]), past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="batch size 2"):
            cache.save(tokens)
        with pytest.raises(ValueError, match="empty cache"):
            cache.restore(tokens)
        with pytest.raises(ValueError, match="only 5 token ids"):
            cache.save(tokens[:5])


@torch.no_grad()
def test_a_vram_pool_serves_the_next_restore_device_to_device(daemon, model):
    from kvtier.vram import VramTier
    tokens = prompt(50, seed=5)
    s = spec("bfloat16")
    with kvtier.Client(daemon.socket) as client, VramTier(client) as owner:
        owner.create_pool("cpu", 8, model=s)        # the host backend: a pool in shared memory
        first = KVTierCache(client, s, dtype=torch.float32, vram=owner)
        first.restore(tokens)
        model(torch.tensor([tokens]), past_key_values=first, use_cache=True)
        assert first.save(tokens) == 50                 # stored, and placed in the pool
        assert client.lookup_detail(s, tokens).vram_tokens == 50

        with VramTier(client) as reader:                # no pool of its own: attaches the owner's
            from_vram = KVTierCache(client, s, dtype=torch.float32, vram=reader)
            assert from_vram.restore(tokens) == 49 and from_vram.restored_from == "vram"
            from_daemon = KVTierCache(client, s, dtype=torch.float32)
            assert from_daemon.restore(tokens) == 49 and from_daemon.restored_from == "daemon"
            for a, b in zip(from_vram.layers, from_daemon.layers):
                assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            assert reader.stats["restores"] == 1 and reader.stats["restoredTokens"] == 49
