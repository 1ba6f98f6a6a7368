"""kvtier.torch: tensor conversion (skipped without torch)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kvtier  # noqa: E402
from kvtier.torch import get_tensors, pin_page_arena, put_tensors  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tensors_round_trip(daemon, device, dtype):
    spec = kvtier.ModelSpec(f"torch-{dtype}", layers=3, kv_heads=2, head_dim=64, dtype=dtype, page_tokens=16)
    tdtype = getattr(torch, dtype)
    n = 37
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3, n, 2, 64, generator=g).to(tdtype).to(device)
    values = torch.randn(3, n, 2, 64, generator=g).to(tdtype).to(device)
    tokens = torch.arange(100, 100 + n, device=device)
    with kvtier.Client(daemon.socket) as c:
        assert put_tensors(c, spec, tokens, keys, values) == n
        k, v = get_tensors(c, spec, tokens, device=device)
        assert k.dtype == tdtype and k.device.type == device and k.shape == (3, n, 2, 64)
        assert torch.equal(k, keys) and torch.equal(v, values)
        k, v = get_tensors(c, spec, tokens.tolist(), max_tokens=20)
        assert k.device.type == "cpu" and torch.equal(k, keys[:, :20].cpu())
        with pytest.raises(TypeError):
            put_tensors(c, spec, tokens, keys.float(), values)
        # bfloat16 arrays come back from the NumPy API as their bit patterns
        if dtype == "bfloat16":
            nk, _ = c.get(spec, tokens.cpu().numpy())
            assert np.array_equal(nk, keys.cpu().view(torch.int16).numpy().view(np.uint16))


@pytest.mark.parametrize("stage", [False, True], ids=["direct", "staged"])
@pytest.mark.parametrize("shared_memory", [True, False], ids=["arena", "inline"])
def test_get_tensors_serves_whole_partial_and_missing_prefixes(daemon, shared_memory, stage):
    # staged: what a GPU device does (one copy of each page to the device, laid out there), on the CPU.
    spec = kvtier.ModelSpec("torch-prefixes", layers=2, kv_heads=3, head_dim=32, dtype="float16", page_tokens=16)
    g = torch.Generator().manual_seed(1)
    n = 70  # four whole pages and a tail of 6
    keys = torch.randn(2, n, 3, 32, generator=g).half()
    values = torch.randn(2, n, 3, 32, generator=g).half()
    tokens = list(range(500, 500 + n))
    with kvtier.Client(daemon.socket, shared_memory=shared_memory) as c:
        assert c.shared_memory == shared_memory
        put_tensors(c, spec, tokens, keys, values)
        for most, want in ((0, n), (33, 33), (64, 64), (69, 69)):
            k, v = get_tensors(c, spec, tokens, max_tokens=most, stage=stage)
            assert k.shape == (2, want, 3, 32) and k.is_contiguous()
            assert torch.equal(k, keys[:, :want]) and torch.equal(v, values[:, :want])
        # A prefix the daemon never saw: nothing served, empty tensors of the right shape.
        k, v = get_tensors(c, spec, [1, 2, 3], stage=stage)
        assert k.shape == v.shape == (2, 0, 3, 32)
        # The lease of each GET was released: the daemon holds none for this client.
        assert c.status()["leases"] == 0


SPEC_PIN = kvtier.ModelSpec("torch-pin", layers=1, kv_heads=1, head_dim=32, dtype="float16", page_tokens=16)


def test_pin_page_arena_says_why_not_and_unpins_at_close(daemon):
    with kvtier.Client(daemon.socket, shared_memory=False) as c:
        assert c.page_arena_address() is None
        assert "no shared page arena" in pin_page_arena(c)
    calls = []
    with kvtier.Client(daemon.socket) as c:
        address, length = c.page_arena_address()
        assert address > 0 and length == c.arena_bytes
        c.on_unmap(lambda: calls.append(c.page_arena_address()))
        if torch.cuda.is_available():
            assert pin_page_arena(c) is None
            put_tensors(c, SPEC_PIN, range(64), *[torch.ones(1, 64, 1, 32, dtype=torch.float16)] * 2)
            k, _ = get_tensors(c, SPEC_PIN, range(64), device="cuda")
            assert bool((k == 1).all()) and c._kvtier_cuda_pins.chunks == {0}
        else:
            assert pin_page_arena(c) == "CUDA is not available"
            assert pin_page_arena(c) == "CUDA is not available"  # decided once per client
    # the hook ran once, before the arena was unmapped (the mapping was still there)
    assert calls == [(address, length)]


def test_engine_load_for_a_gpu_sink_serves_every_page_whether_or_not_it_can_pin(daemon):
    from kvtier.engine import EngineCache
    from kvtier.torch import pin_pages

    spec = kvtier.ModelSpec("torch-engine-pin", layers=2, kv_heads=1, head_dim=32, dtype="float16", page_tokens=16)
    keys = torch.randn(2, 48, 1, 32).half()
    values = torch.randn(2, 48, 1, 32).half()
    with kvtier.Client(daemon.socket) as c:
        put_tensors(c, spec, range(48), keys, values)
    cache = EngineCache(daemon.socket)
    got = []
    try:
        assert cache.load(spec, list(range(48)), lambda a, page: got.append((a, page.copy())), pin_cuda=True) == 48
    finally:
        cache.close()
    assert [a for a, _ in got] == [0, 16, 32]
    for a, page in got:
        assert np.array_equal(page[:, 0], keys[:, a:a + 16].numpy().view(np.uint16))
    with kvtier.Client(daemon.socket, shared_memory=False) as c:
        page = np.zeros((2, 2, 16, 1, 32), np.uint16)
        assert pin_pages(c, page) is False  # no arena, or no CUDA: not pinned, and says so
