"""The engine-facing layer without an engine: Client.put_pages/get_pages against a real kvtierd,
EngineCache's soft failures, and the vLLM paged-layout copies (torch, no vLLM)."""

from __future__ import annotations

import numpy as np
import pytest

import kvtier
from kvtier.engine import EngineCache, LoadFailed

from conftest import Daemon

MODEL = kvtier.ModelSpec("engine-test", layers=3, kv_heads=2, head_dim=8, dtype="bfloat16", page_tokens=32)


def kv(n, seed=3):
    rng = np.random.default_rng(seed)
    shape = (MODEL.layers, n, MODEL.kv_heads, MODEL.head_dim)
    return rng.integers(0, 1 << 16, shape, dtype=np.uint16), rng.integers(0, 1 << 16, shape, dtype=np.uint16)


@pytest.mark.parametrize("shared_memory", [True, False])
def test_put_pages_and_get_pages_move_exact_bytes_page_by_page(daemon, shared_memory):
    keys, values = kv(100)
    tokens = list(range(1000, 1100)) if shared_memory else list(range(2000, 2100))
    asked = []
    with kvtier.Client(daemon.socket, shared_memory=shared_memory) as c:
        def fill(a, b, dest):
            asked.append((a, b))
            assert dest.shape == (3, 2, b - a, 2, 8) and dest.flags.writeable
            dest[:, 0] = keys[:, a:b]
            dest[:, 1] = values[:, a:b]

        r = c.put_pages(MODEL, tokens[:70], fill)
        assert (r.cached_tokens, r.sent_tokens) == (70, 70)
        assert asked == [(0, 32), (32, 64), (64, 70)]  # never across a page boundary
        asked.clear()
        r = c.put_pages(MODEL, tokens, fill)  # only what the daemon lacks, completing the partial page
        assert asked == [(70, 96), (96, 100)] and r.cached_tokens == 100

        seen = []
        got_k, got_v = np.zeros_like(keys), np.zeros_like(values)

        def visit(a, page):
            seen.append((a, page.shape[2]))
            got_k[:, a:a + page.shape[2]] = page[:, 0]
            got_v[:, a:a + page.shape[2]] = page[:, 1]

        served = c.get_pages(MODEL, tokens + [7], visit, max_tokens=90)
        assert served == 90 and seen == [(0, 32), (32, 32), (64, 26)]
        assert np.array_equal(got_k[:, :90], keys[:, :90]) and np.array_equal(got_v[:, :90], values[:, :90])


def test_engine_cache_hits_are_block_aligned_and_leave_a_token(daemon):
    keys, values = kv(100)
    tokens = list(range(5000, 5100))
    cache = EngineCache(daemon.socket)
    with kvtier.Client(daemon.socket) as c:
        c.put(MODEL, tokens, keys, values)
    assert cache.lookup(MODEL, tokens, block=16).tokens == 96
    assert cache.lookup(MODEL, tokens[:96], block=16).tokens == 80  # one token left to compute
    assert cache.lookup(MODEL, tokens[:40] + [1], block=16).tokens == 32
    got = np.zeros((3, 2, 96, 2, 8), np.uint16)
    loaded = cache.load(MODEL, tokens[:96], lambda a, page: got[:, :, a:a + page.shape[2]].__setitem__(Ellipsis, page))
    assert loaded == 96 and np.array_equal(got[:, 0], keys[:, :96])
    with pytest.raises(LoadFailed) as failed:
        cache.load(MODEL, tokens[:96] + [9] * 40, lambda a, page: None)
    assert failed.value.loaded == 96
    cache.close()


def test_engine_cache_turns_a_missing_or_dead_daemon_into_misses(daemon, tmp_path, caplog):
    cache = EngineCache(str(tmp_path / "nobody.sock"), retry_interval=3600)
    assert cache.lookup(MODEL, list(range(64)), block=16).tokens == 0
    assert not cache.available and cache.stats.unavailable == 1
    assert cache.store(MODEL, list(range(64)), lambda a, b, d: None) is None
    with pytest.raises(LoadFailed):
        cache.load(MODEL, list(range(64)), lambda a, page: None)
    assert cache.stats.unavailable == 1, "no reconnect attempt before retry_interval"
    assert "kvtierd unavailable" in caplog.text



def test_engine_cache_survives_the_daemon_dying_under_it(binary, caplog):
    d = Daemon(binary)
    try:
        cache = EngineCache(d.socket, retry_interval=0.0)
        keys, values = kv(64)

        def fill(a, b, dest):
            dest[:, 0] = keys[:, a:b]
            dest[:, 1] = values[:, a:b]

        assert cache.store(MODEL, list(range(64)), fill).cached_tokens == 64
        assert cache.lookup(MODEL, list(range(65)), block=16).tokens == 64
        d.proc.kill()
        d.proc.wait()
        assert cache.lookup(MODEL, list(range(65)), block=16).tokens == 0
        assert cache.store(MODEL, list(range(80)), fill) is None
        with pytest.raises(LoadFailed):
            cache.load(MODEL, list(range(64)), lambda a, page: None)
        assert not cache.available and "kvtierd unavailable" in caplog.text
    finally:
        d.stop()


@pytest.mark.parametrize("stage_pages", [False, True], ids=["strided", "staged"])
def test_vllm_paged_layout_round_trips_through_pages(stage_pages):
    # staged: what a CUDA KV cache does (one contiguous copy of the page to the device, then the
    # scatter there), run on the CPU.
    torch = pytest.importorskip("torch")
    from kvtier.vllm._layout import PagedKV, blocks_of

    blocks, block, heads, dim, layers = 6, 16, 2, 8, 3
    for split in ("cpu", "last-dim"):
        caches = {f"model.layers.{i}.self_attn.attn": torch.randint(-30000, 30000, (blocks, heads, block, 2 * dim), dtype=torch.int16).view(torch.bfloat16)
                  for i in (2, 0, 1)}
        paged = PagedKV(caches, blocks, block, heads, dim, split, stage_pages=stage_pages)
        assert paged.stage_pages == stage_pages
        assert paged.layer_names == [f"model.layers.{i}.self_attn.attn" for i in range(3)]
        block_ids = [4, 1, 5]
        page = np.zeros((layers, 2, 40, heads, dim), np.uint16)
        paged.gather(block_ids, 0, 40, page)
        # The reference: what the backend's own view of the cache says token t's keys are.
        for li, name in enumerate(paged.layer_names):
            raw = caches[name].view(torch.int16)
            for t in range(40):
                b, o = block_ids[t // block], t % block
                if split == "cpu":
                    k_ref = raw.view(blocks, heads, 2 * block, dim)[b, :, o]
                    v_ref = raw.view(blocks, heads, 2 * block, dim)[b, :, block + o]
                else:
                    k_ref, v_ref = raw[b, :, o, :dim], raw[b, :, o, dim:]
                assert np.array_equal(page[li, 0, t].view(np.int16), k_ref.numpy())
                assert np.array_equal(page[li, 1, t].view(np.int16), v_ref.numpy())
        # Scatter into other blocks, skipping the first 16 tokens (already computed), and read back.
        other = [0, 2, 3]
        before = {n: t.clone() for n, t in caches.items()}
        paged.scatter(other, 0, page, first=16)
        back = np.zeros_like(page)
        paged.gather(other, 0, 40, back)
        assert np.array_equal(back[:, :, 16:], page[:, :, 16:])
        for name in caches:  # block 0 (tokens before `first`) and unrelated blocks untouched
            for b in (0, 1, 4, 5):
                assert torch.equal(caches[name][b].view(torch.int16), before[name][b].view(torch.int16))
        assert blocks_of(other, block, 16, 40) == (2, 3)


def test_vllm_paged_kv_moves_pages_through_a_vram_pool(daemon):
    # What two vLLM workers with vram_pages do: one saves a request and places its pages in its
    # pool straight from its blocks; the other loads them from the pool into its own blocks.
    # On the CPU the pool is shared memory; on a GPU the same calls are device-to-device copies.
    torch = pytest.importorskip("torch")
    from kvtier.vllm._layout import PagedKV
    from kvtier.vram import VramTier

    blocks, block, heads, dim, layers = 8, 16, 2, 8, 2
    spec = kvtier.ModelSpec("vllm-vram", layers=layers, kv_heads=heads, head_dim=dim, dtype="bfloat16",
                            page_tokens=32)

    def worker(seed):
        g = torch.Generator().manual_seed(seed)
        caches = {f"model.layers.{i}.self_attn.attn": torch.randint(-30000, 30000, (blocks, heads, block, 2 * dim),
                                                                     generator=g, dtype=torch.int16).view(torch.bfloat16)
                  for i in range(layers)}
        return PagedKV(caches, blocks, block, heads, dim, "last-dim")

    a, b = worker(1), worker(2)
    tokens = list(range(700, 750))                  # a page of 32 and a partial page of 18
    saved_blocks, loaded_blocks = [5, 0, 3, 6], [1, 7, 2, 4]
    with kvtier.Client(daemon.socket) as c, VramTier(c) as owner, VramTier(c) as reader:
        c.put_pages(spec, tokens, lambda lo, hi, dest: a.gather(saved_blocks, lo, hi, dest))
        owner.create_pool("cpu", 4, model=spec)
        placed = owner.place_from(spec, tokens, lambda lo, hi, page: a.gather_tensor(saved_blocks, lo, hi, page))
        assert placed == 50 and c.lookup_detail(spec, tokens).vram_tokens == 50
        served = reader.restore_into(spec, tokens, lambda at, page: b.scatter_tensor(loaded_blocks, at, page, 0),
                                     min_tokens=50)
        assert served == 50
    want = np.zeros((layers, 2, 50, heads, dim), np.uint16)
    got = np.zeros_like(want)
    a.gather(saved_blocks, 0, 50, want)
    b.gather(loaded_blocks, 0, 50, got)
    assert np.array_equal(got, want)


def test_kernel_blocks_smaller_than_manager_blocks():
    torch = pytest.importorskip("torch")
    from kvtier.vllm._layout import PagedKV

    # 4 manager blocks of 32 tokens held as 8 kernel blocks of 16.
    caches = {"layers.0.attn": torch.arange(8 * 1 * 16 * 4, dtype=torch.int16).view(8, 1, 16, 4).view(torch.float16)}
    paged = PagedKV(caches, 4, 32, 1, 2, "last-dim")
    page = np.zeros((1, 2, 32, 1, 2), np.uint16)
    paged.gather([3], 0, 32, page)
    raw = caches["layers.0.attn"].view(torch.int16)
    assert np.array_equal(page[0, 0, :16, 0].view(np.int16), raw[6, 0, :, :2].numpy())
    assert np.array_equal(page[0, 0, 16:, 0].view(np.int16), raw[7, 0, :, :2].numpy())


def test_put_and_get_read_an_iterator_of_tokens_once(daemon):
    keys, values = kv(40)
    with kvtier.Client(daemon.socket) as c:
        assert c.put(MODEL, iter(range(7000, 7040)), keys, values) == 40
        got_k, got_v = c.get(MODEL, iter(range(7000, 7040)), out=(np.zeros_like(keys), np.zeros_like(values)))
        assert np.array_equal(got_k, keys) and np.array_equal(got_v, values)
