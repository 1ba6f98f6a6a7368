"""Attention-weighted offload (kvtier.offload, kvtier.transformers.OffloadedCache) against a real
kvtierd: GET of chosen pages, the pages the summaries pick, sticky promotion, window pages moving
to kvtierd, the Transformers cache against a full cache, and prefetch from ATTENTION reports.

Small shapes so each test takes about a second on one CPU thread; the 4K/8K measurements with
SmolLM2-135M are Benchmarks/offload/offload_quality.py's.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch (scripts/install-deps installs a CPU wheel)")

import kvtier  # noqa: E402
from kvtier.offload import OffloadPlan, PagedAttention  # noqa: E402

torch.set_num_threads(1)  # tiny tensors: threads cost more than they give on a shared 2-core host

LAYERS, KV_HEADS, GROUPS, DIM, PAGE = 2, 2, 2, 16, 8
SCALE = DIM ** -0.5


def spec(name="offload-synthetic", dtype="float16"):
    return kvtier.ModelSpec(name, layers=LAYERS, kv_heads=KV_HEADS, head_dim=DIM, dtype=dtype, page_tokens=PAGE)


def prompt_kv(n, seed, dtype=torch.float16):
    """Per layer [kv_heads, n, dim] keys and values, exactly representable in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(KV_HEADS, n, DIM, generator=g).to(dtype).float() for _ in range(LAYERS)]
    values = [torch.randn(KV_HEADS, n, DIM, generator=g).to(dtype).float() for _ in range(LAYERS)]
    return keys, values


def token_ids(n, seed):
    return np.random.default_rng(seed).integers(0, 50_000, n).tolist()


def dense(q, keys, values, positions):
    """Attention of ``q`` [kv_heads * groups, dim] over ``positions`` (per head, lists of token
    indices) of ``keys``/``values`` [kv_heads, n, dim]."""
    out = []
    for h in range(KV_HEADS):
        idx = torch.tensor(sorted(positions[h]))
        k, v = keys[h, idx], values[h, idx]
        for g in range(GROUPS):
            p = torch.softmax(q[h * GROUPS + g] @ k.T * SCALE, dim=-1)
            out.append(p @ v)
    return torch.stack(out)


def page_tokens(page):
    return list(range(page * PAGE, (page + 1) * PAGE))


@pytest.fixture(scope="module")
def client(daemon):
    with kvtier.Client(daemon.socket) as c:
        yield c


def test_lease_pages_serves_the_chosen_pages(daemon):
    model = spec("offload-lease")
    tokens = token_ids(10 * PAGE, seed=1)
    keys, values = prompt_kv(10 * PAGE, seed=1)
    k = torch.stack(keys).transpose(1, 2).half().numpy()      # [layers, n, heads, dim]
    v = torch.stack(values).transpose(1, 2).half().numpy()
    for shared in (True, False):
        with kvtier.Client(daemon.socket, shared_memory=shared) as c:
            c.put(model, tokens, k, v)
            with c.lease_pages(model, tokens, [1, 4, 9]) as lease:
                assert lease.pages == [1, 4, 9]
                for j, page in enumerate(lease.pages):
                    got = lease.page(j).view(np.float16)
                    assert np.array_equal(got[:, 0], k[:, page * PAGE:(page + 1) * PAGE])
                    assert np.array_equal(got[:, 1], v[:, page * PAGE:(page + 1) * PAGE])
            with pytest.raises(ValueError):
                lease.page(0)
            # Pages are found by their keys: past the stored sequence the list ends.
            longer = tokens + token_ids(3 * PAGE, seed=2)
            with c.lease_pages(model, longer, [2, 11, 12]) as lease:
                assert lease.pages == [2]
            with pytest.raises(ValueError):
                c.lease_pages(model, tokens, [3, 2])
            with pytest.raises(ValueError):
                c.lease_pages(model, tokens, [10])


def test_fetched_pages_are_the_ones_the_summaries_pick(client):
    n = 16 * PAGE
    keys, values = prompt_kv(n, seed=3)
    tokens = token_ids(n, seed=3)
    plan = OffloadPlan(page_tokens=PAGE, window_tokens=2 * PAGE, promoted_pages=0, fetch_pages=3)
    paged = PagedAttention(client, spec(), plan, query_heads=KV_HEADS * GROUPS, dtype=torch.float32)
    paged.start(keys, values, tokens)
    cold = paged.cold_pages
    assert (cold.start, cold.stop) == (1, 14)  # 1 sink page, window from page 14 (16 tokens)
    g = torch.Generator().manual_seed(4)
    for step in range(3):
        new_k, new_v = prompt_kv(1, seed=100 + step)
        paged.add_token(7 + step)
        for layer in range(LAYERS):
            paged.append(layer, new_k[layer], new_v[layer])
            keys[layer] = torch.cat([keys[layer], new_k[layer]], 1)
            values[layer] = torch.cat([values[layer], new_v[layer]], 1)
        for layer in range(LAYERS):
            q = torch.randn(KV_HEADS * GROUPS, DIM, generator=g)
            out = paged.attend(layer, q, SCALE)
            # The bound, computed here from the full keys: per head, the best of its group.
            pages = keys[layer][:, :cold.stop * PAGE].reshape(KV_HEADS, cold.stop, PAGE, DIM)
            qg = q.reshape(KV_HEADS, GROUPS, 1, DIM)
            low, high = pages.amin(2)[:, None], pages.amax(2)[:, None]
            bound = torch.maximum(qg * low, qg * high).sum(-1).amax(1)      # [heads, pages]
            fetched = paged.last_fetch[layer]
            positions = []
            for h in range(KV_HEADS):
                want = set(bound[h, cold.start:cold.stop].topk(3).indices.add(cold.start).tolist())
                assert set(fetched[h].tolist()) == want, (step, layer, h)
                chosen = page_tokens(0) + [t for page in sorted(want) for t in page_tokens(page)]
                positions.append(chosen + list(range(paged.window_start, paged.length)))
            reference = dense(q, keys[layer], values[layer], positions)
            # Every tensor is exactly representable in float16; what differs is float32 summation order.
            assert torch.allclose(out, reference, rtol=0, atol=1e-5), (out - reference).abs().max()
        paged.end_step()
    assert paged.stats.pages_fetched == 3 * LAYERS * KV_HEADS * 3
    assert paged.stats.attended_tokens_max <= plan.max_attended_tokens


def test_promotion_is_sticky(client):
    """A page promoted by observed mass stays ``patience`` steps after its mass falls below
    ``demote_mass``, is not fetched while promoted, and comes back when attention returns."""
    n = 12 * PAGE
    keys, values = prompt_kv(n, seed=5)
    hot = 5
    # Channel 0 is 0 in every key but the hot page's: a query along it attends to that page alone,
    # one against it spreads evenly over the others (about 0.14 a page: never promoted).
    for layer in range(LAYERS):
        keys[layer][:, :, 0] = 0
        keys[layer][:, hot * PAGE:(hot + 1) * PAGE] = 0
        keys[layer][:, hot * PAGE:(hot + 1) * PAGE, 0] = 4
    plan = OffloadPlan(page_tokens=PAGE, window_tokens=2 * PAGE, promoted_pages=1, fetch_pages=2,
                       promote_mass=0.3, demote_mass=0.05, patience=3, decay=0.5, swap_margin=1e9)
    paged = PagedAttention(client, spec(), plan, query_heads=KV_HEADS * GROUPS, dtype=torch.float32)
    paged.start(keys, values, token_ids(n, seed=5))
    toward = torch.zeros(KV_HEADS * GROUPS, DIM)
    toward[:, 0] = 12
    away = -toward

    def step(q):
        new_k, new_v = prompt_kv(1, seed=paged.length)
        paged.add_token(paged.length)
        for layer in range(LAYERS):
            new_k[layer][:, :, 0] = 0
            paged.append(layer, new_k[layer], new_v[layer])
        for layer in range(LAYERS):
            paged.attend(layer, q, SCALE)
        paged.end_step()
        return [paged.layers[layer].prom_ids[:, 0].tolist() for layer in range(LAYERS)]

    assert step(toward) == [[hot, hot]] * LAYERS           # fetched, mass ~1, average 0.5: promoted
    assert paged.last_fetch[0].shape[1] == 3, "the empty promoted slot fetched a page too"
    promoted_at = paged.stats.promotions
    # Averages after each step away: 0.25, 0.125, 0.0625, then 0.031 (below 0.05: 1), 0.016 (2), 0.008 (3: out).
    for _ in range(5):
        assert step(away) == [[hot, hot]] * LAYERS
        assert paged.last_fetch[0].shape[1] == 2
        assert all(hot not in paged.last_fetch[layer].flatten().tolist() for layer in range(LAYERS))
    gone = step(away)
    assert all(hot not in row for row in gone), gone
    assert paged.stats.demotions == LAYERS * KV_HEADS
    assert step(toward) == [[hot, hot]] * LAYERS
    assert paged.stats.promotions == promoted_at + LAYERS * KV_HEADS


def test_window_pages_move_to_kvtierd(client):
    model = spec("offload-window")
    n = 6 * PAGE
    keys, values = prompt_kv(n + 3 * PAGE, seed=6)
    tokens = token_ids(n + 3 * PAGE, seed=6)
    plan = OffloadPlan(page_tokens=PAGE, window_tokens=2 * PAGE, promoted_pages=1, fetch_pages=1)
    paged = PagedAttention(client, model, plan, query_heads=KV_HEADS * GROUPS, dtype=torch.float32)
    paged.start([k[:, :n] for k in keys], [v[:, :n] for v in values], tokens[:n])
    assert paged.window_start == 4 * PAGE and client.lookup(model, tokens) == 4 * PAGE
    q = torch.randn(KV_HEADS * GROUPS, DIM, generator=torch.Generator().manual_seed(7))
    for t in range(n, n + 3 * PAGE):
        paged.add_token(tokens[t])
        for layer in range(LAYERS):
            paged.append(layer, keys[layer][:, t:t + 1], values[layer][:, t:t + 1])
        for layer in range(LAYERS):
            paged.attend(layer, q, SCALE)
        paged.end_step()
        # The window never holds less than window_tokens nor a whole page more.
        assert 2 * PAGE <= paged.length - paged.window_start < 3 * PAGE
    assert client.lookup(model, tokens) == paged.window_start == 7 * PAGE
    stored_k, _ = client.get(model, tokens[:7 * PAGE])
    expected = torch.stack([k[:, :7 * PAGE] for k in keys]).transpose(1, 2).half().numpy()
    assert np.array_equal(stored_k, expected)
    # The retired pages got summaries like the prompt's.
    layer = paged.layers[1]
    assert layer.kmax.shape[1] == 7
    assert torch.equal(layer.kmax[:, 6], keys[1][:, 6 * PAGE:7 * PAGE].amax(1))


def test_attention_report_prefetches_disk_pages(daemon):
    model = spec("offload-prefetch")
    n = 12 * PAGE
    keys, values = prompt_kv(n, seed=8)
    tokens = token_ids(n, seed=8)
    k = torch.stack(keys).transpose(1, 2).half().numpy()
    v = torch.stack(values).transpose(1, 2).half().numpy()
    with kvtier.Client(daemon.socket) as c:
        c.put(model, tokens, k, v)
        c.evict(model, tokens)
        before = c.status()
        mass = np.zeros(12, dtype=np.float32)
        mass[[3, 7]] = [0.4, 0.2]
        mass[9] = 0.001  # under the daemon's least mass (0.01)
        c.report_attention(model, tokens, mass)
        deadline = time.monotonic() + 30
        while c.status()["prefetch_loaded"] - before["prefetch_loaded"] < 2:
            assert time.monotonic() < deadline, c.status()
            time.sleep(0.01)
        with c.lease_pages(model, tokens, [3, 7, 9]) as lease:
            assert lease.pages == [3, 7, 9]
            assert np.array_equal(lease.page(0).view(np.float16)[:, 0], k[:, 3 * PAGE:4 * PAGE])
        after = c.status()
    delta = {name: after[name] - before.get(name, 0) for name in after}
    assert delta["prefetch_issued"] == 2 and delta["prefetch_useful"] == 2, delta
    assert delta["promotions"] == 1, delta  # page 9: read on demand


def tiny_llama(query_heads=4, kv_heads=2, hidden=64, layers=2, seed=0):
    transformers = pytest.importorskip("transformers", reason="needs transformers >= 4.56")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=query_heads, num_key_value_heads=kv_heads,
                                      max_position_embeddings=1024)
    return transformers.LlamaForCausalLM(config).eval()


@torch.no_grad()
def test_transformers_cache_matches_the_full_cache_when_it_attends_to_everything(client):
    transformers = pytest.importorskip("transformers", reason="needs transformers >= 4.56")
    from kvtier.transformers import OffloadedCache, enable_offload

    model = enable_offload(tiny_llama())
    hf_spec = kvtier.ModelSpec("offload-tiny-llama", layers=2, kv_heads=2, head_dim=16, dtype="float16", page_tokens=16)
    ids = torch.randint(0, 128, (1, 162), generator=torch.Generator().manual_seed(9))
    prompt, end = 150, 162

    def decode(cache, round_cold=None):
        model(ids[:, :prompt], past_key_values=cache)
        if round_cold:  # the reference for pages that went through kvtierd's float16
            a, b = round_cold
            for layer in cache.layers:
                layer.keys[:, :, a:b] = layer.keys[:, :, a:b].half().float()
                layer.values[:, :, a:b] = layer.values[:, :, a:b].half().float()
        return torch.stack([model(ids[:, t:t + 1], past_key_values=cache).logits[0, -1] for t in range(prompt, end)])

    full = decode(transformers.DynamicCache())
    # Everything resident: the window holds the whole sequence, nothing is fetched.
    everything = OffloadPlan(page_tokens=16, window_tokens=256, mode="window")
    cache = OffloadedCache(client, hf_spec, everything, query_heads=4, dtype=torch.float32)
    resident = decode(cache)
    assert cache.stats.pages_fetched == 0 and cache.paged.window_start == 0
    # float32 throughout; the paged path sums in another order than SDPA.
    assert torch.allclose(resident, full, rtol=0, atol=1e-5), (resident - full).abs().max()
    # Every cold page fetched at every step: the full cache's logits, with the cold pages (1 to 6:
    # the window starts at 150 - 38 = 112 and gives up no page in 12 steps) rounded to float16
    # as kvtierd stores them.
    fetch_all = OffloadPlan(page_tokens=16, window_tokens=38, promoted_pages=0, fetch_pages=6)
    cache = OffloadedCache(client, hf_spec, fetch_all, query_heads=4, dtype=torch.float32)
    fetched = decode(cache)
    assert cache.paged.window_start == 112 and cache.stats.pages_fetched == 12 * 2 * 2 * 6
    reference = decode(transformers.DynamicCache(), round_cold=(16, 112))
    assert torch.allclose(fetched, reference, rtol=0, atol=1e-5), (fetched - reference).abs().max()
    # A budget of a quarter: fewer tokens attended, logits near but not equal.
    quarter = OffloadPlan.for_budget(50, 8, window_pages=2)
    small_spec = kvtier.ModelSpec("offload-tiny-llama-8", layers=2, kv_heads=2, head_dim=16, dtype="float16", page_tokens=8)
    cache = OffloadedCache(client, small_spec, quarter, query_heads=4, dtype=torch.float32)
    partial = decode(cache)
    assert cache.stats.attended_tokens_max <= 50
    assert not torch.allclose(partial, full, rtol=0, atol=1e-5)


@torch.no_grad()
def test_generate_runs_with_an_offloaded_cache(client):
    pytest.importorskip("transformers", reason="needs transformers >= 4.56")
    from kvtier.transformers import OffloadedCache, enable_offload

    model = enable_offload(tiny_llama(seed=1))
    hf_spec = kvtier.ModelSpec("offload-tiny-llama-gen", layers=2, kv_heads=2, head_dim=16, dtype="float16", page_tokens=16)
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(10))
    plan = OffloadPlan(page_tokens=16, window_tokens=32, promoted_pages=1, fetch_pages=16)
    cache = OffloadedCache(client, hf_spec, plan, query_heads=4, dtype=torch.float32)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=12, do_sample=False)
    plain = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert out.shape == (1, 132) and cache.get_seq_length() == 131
    # Attending to every page (float16-rounded ones): the same greedy tokens on this seed.
    assert torch.equal(out, plain)
    assert math.isclose(cache.stats.steps, 11)


def test_dense_layers_fetch_every_cold_page(client):
    n = 10 * PAGE
    keys, values = prompt_kv(n, seed=11)
    plan = OffloadPlan.for_budget(8 * PAGE, PAGE, window_pages=2, promoted_share=0, dense_layers=1, layers=LAYERS,
                                  context_tokens=n)
    # Two layers at 8 pages of budget each: the dense one takes all 10, the other what is left (6
    # pages: a sink page, the window and 2 to fetch), so the mean keeps to the budget.
    assert plan.dense_layers == 1 and plan.fetch_pages == 2 and plan.promoted_pages == 0
    assert (n + plan.max_attended_tokens) / 2 <= 8 * PAGE
    with pytest.raises(ValueError):
        OffloadPlan.for_budget(5 * PAGE, PAGE, window_pages=2, dense_layers=1, layers=LAYERS, context_tokens=n)
    paged = PagedAttention(client, spec(), plan, query_heads=KV_HEADS * GROUPS, dtype=torch.float32)
    paged.start(keys, values, token_ids(n, seed=11))
    cold = paged.cold_pages
    new_k, new_v = prompt_kv(1, seed=12)
    paged.add_token(1)
    q = torch.randn(KV_HEADS * GROUPS, DIM, generator=torch.Generator().manual_seed(13))
    for layer in range(LAYERS):
        paged.append(layer, new_k[layer], new_v[layer])
    outs = [paged.attend(layer, q, SCALE) for layer in range(LAYERS)]
    for h in range(KV_HEADS):
        assert sorted(paged.last_fetch[0][h].tolist()) == list(cold)
        assert len(paged.last_fetch[1][h]) == 2
    # The dense layer attends to everything: the dense reference over every token.
    everything = [list(range(paged.length))] * KV_HEADS
    k0 = torch.cat([keys[0], new_k[0]], 1)
    v0 = torch.cat([values[0], new_v[0]], 1)
    assert torch.allclose(outs[0], dense(q, k0, v0, everything), rtol=0, atol=1e-5)
    paged.end_step()
