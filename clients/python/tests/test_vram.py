"""kvtier.vram: the pool of page slots, on its host backend (the CUDA backend runs on the lent
GPU through Benchmarks/gpu/restore_paths.py)."""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

import kvtier  # noqa: E402
from kvtier import vram  # noqa: E402

SPEC = kvtier.ModelSpec("vram-test", layers=3, kv_heads=2, head_dim=8, dtype="bfloat16", page_tokens=16)


def kv(tokens, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (3, tokens, 2, 8)
    return torch.randn(shape, generator=g).to(torch.bfloat16), torch.randn(shape, generator=g).to(torch.bfloat16)


def fill(pool, keys, values, slots):
    P = SPEC.page_tokens
    for i, slot in enumerate(slots):
        vram.store_page(pool, slot, SPEC, keys[:, i * P:(i + 1) * P], values[:, i * P:(i + 1) * P])


def test_restore_returns_the_stored_pages_in_slot_order_with_a_partial_last_page():
    keys, values = kv(40, 1)   # pages of 16, 16 and 8 tokens
    with vram.VramPool.create("cpu", 5, vram.page_bytes(SPEC)) as pool:
        slots = [3, 0, 4]
        fill(pool, keys, values, slots)
        k, v = vram.restore_pages(pool, slots, SPEC, 40)
        assert k.dtype == torch.bfloat16 and k.shape == (3, 40, 2, 8)
        assert torch.equal(k.view(torch.int16), keys.view(torch.int16))
        assert torch.equal(v.view(torch.int16), values.view(torch.int16))
        # A prefix that stops inside a page.
        k, v = vram.restore_pages(pool, slots[:2], SPEC, 20)
        assert torch.equal(k.view(torch.int16), keys[:, :20].view(torch.int16))


def test_another_process_attaches_the_pool_and_reads_the_same_bytes():
    keys, values = kv(32, 2)
    with vram.VramPool.create("cpu", 2, vram.page_bytes(SPEC)) as pool:
        fill(pool, keys, values, [1, 0])
        code = (
            "import sys, json, torch, kvtier\n"
            "from kvtier import vram\n"
            "job = json.loads(sys.stdin.read())\n"
            "spec = kvtier.ModelSpec(**job['spec'])\n"
            "with vram.VramPool.attach(job['handle'].encode()) as pool:\n"
            "    k, v = vram.restore_pages(pool, [1, 0], spec, 32)\n"
            "    print(json.dumps([k.view(torch.int16).reshape(-1).tolist(), v.view(torch.int16).reshape(-1).tolist()]))\n"
        )
        job = {"handle": pool.handle.to_bytes().decode(),
               "spec": dict(name=SPEC.name, layers=3, kv_heads=2, head_dim=8, dtype="bfloat16", page_tokens=16)}
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        r = subprocess.run([sys.executable, "-c", code], input=json.dumps(job), capture_output=True, text=True,
                           timeout=120, env=env)
        assert r.returncode == 0, r.stderr
        k, v = json.loads(r.stdout)
        assert k == keys.view(torch.int16).reshape(-1).tolist()
        assert v == values.view(torch.int16).reshape(-1).tolist()


def test_the_creator_closing_removes_the_shared_file():
    pool = vram.VramPool.create("cpu", 1, 64)
    path = os.path.join("/dev/shm", pool.handle.ipc.decode())
    assert os.path.exists(path) and (os.stat(path).st_mode & 0o777) == 0o600
    pool.close()
    pool.close()  # idempotent
    assert not os.path.exists(path)
    with pytest.raises(FileNotFoundError):
        vram.VramPool.attach(pool.handle)


@pytest.mark.parametrize("data", [
    b"not json",
    b'{"backend": "rdma", "device_uuid": "", "slots": 1, "slot_bytes": 1, "owner_pid": 1, "ipc": ""}',
    b'{"backend": "cuda", "device_uuid": "x", "slots": 1, "slot_bytes": 1, "owner_pid": 1, "ipc": "AAAA"}',
    b'{"backend": "host", "device_uuid": "", "slots": 1, "slot_bytes": 1, "owner_pid": 1, "ipc": "Li4vLi4vZXRjL3Bhc3N3ZA=="}',
    b'{"backend": "host", "device_uuid": "", "slots": 0, "slot_bytes": 1, "owner_pid": 1, "ipc": ""}',
])
def test_handles_that_are_not_a_pool_are_refused_before_anything_is_opened(data):
    with pytest.raises(vram.VramError):
        vram.VramPool.attach(data)


def test_wrong_shapes_and_slots_are_refused():
    with vram.VramPool.create("cpu", 2, vram.page_bytes(SPEC)) as pool:
        keys, values = kv(17, 3)
        with pytest.raises(vram.VramError, match="at most 16 tokens"):
            vram.store_page(pool, 0, SPEC, keys, values)
        with pytest.raises(IndexError):
            pool.slot(2)
        with pytest.raises(vram.VramError, match="take 2 pages"):
            vram.restore_pages(pool, [0], SPEC, 20)
    small = kvtier.ModelSpec("vram-test", layers=3, kv_heads=2, head_dim=8, dtype="bfloat16", page_tokens=32)
    with vram.VramPool.create("cpu", 1, vram.page_bytes(SPEC)) as pool:
        with pytest.raises(vram.VramError, match="slots have"):
            vram.restore_pages(pool, [0], small, 32)


# --- through kvtierd's directory (VRAM_POOL / VRAM_PLACE / VRAM_COMMIT / VRAM_LEASE) ----------

def put(client, tokens, seed):
    keys, values = kv(len(tokens), seed)
    from kvtier.torch import put_tensors
    put_tensors(client, SPEC, tokens, keys, values)
    return keys, values


def test_a_second_process_restores_what_the_first_placed(daemon):
    tokens = list(range(500, 540))                  # pages of 16, 16 and a partial 8
    with kvtier.Client(daemon.socket) as c, vram.VramTier(c) as owner:
        keys, values = put(c, tokens, 10)
        owner.create_pool("cpu", 4, model=SPEC)
        assert c.lookup_detail(SPEC, tokens).vram_tokens == 0
        assert owner.place(SPEC, tokens, keys, values) == 40
        assert c.lookup_detail(SPEC, tokens).vram_tokens == 40
        assert owner.place(SPEC, tokens, keys, values) == 40   # nothing new to place
        assert owner.stats["placedPages"] == 3
        code = (
            "import sys, json, torch, kvtier\n"
            "from kvtier import vram\n"
            "job = json.loads(sys.stdin.read())\n"
            "spec = kvtier.ModelSpec(**job['spec'])\n"
            "with kvtier.Client(job['socket']) as c, vram.VramTier(c) as tier:\n"
            "    k, v = tier.restore(spec, job['tokens'])\n"
            "    part = tier.restore(spec, job['tokens'], max_tokens=20)\n"
            "    print(json.dumps([k.view(torch.int16).reshape(-1).tolist(), v.view(torch.int16).reshape(-1).tolist(),\n"
            "                      part[0].shape[1], tier.stats]))\n"
        )
        job = {"socket": daemon.socket, "tokens": tokens,
               "spec": dict(name=SPEC.name, layers=3, kv_heads=2, head_dim=8, dtype="bfloat16", page_tokens=16)}
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        r = subprocess.run([sys.executable, "-c", code], input=json.dumps(job), capture_output=True, text=True,
                           timeout=120, env=env)
        assert r.returncode == 0, r.stderr
        k, v, part, stats = json.loads(r.stdout)
        assert k == keys.view(torch.int16).reshape(-1).tolist()
        assert v == values.view(torch.int16).reshape(-1).tolist()
        assert part == 20 and stats["restores"] == 2
    # The owner's connection closed with the tier: the pool is gone from the directory.
    with kvtier.Client(daemon.socket) as c, vram.VramTier(c) as tier:
        assert c.lookup_detail(SPEC, tokens).vram_tokens == 0
        assert tier.restore(SPEC, tokens) is None and tier.stats["misses"] == 1


def test_only_pages_kvtierd_holds_are_placed_and_a_full_pool_evicts_the_coldest(daemon):
    hot, cold, new = list(range(1000, 1016)), list(range(2000, 2016)), list(range(3000, 3032))
    with kvtier.Client(daemon.socket) as c, vram.VramTier(c) as tier:
        tier.create_pool("cpu", 3, model=SPEC)
        nk, nv = kv(32, 20)
        assert tier.place(SPEC, new, nk, nv) == 0       # not stored in kvtierd: nothing placed
        hk, hv = put(c, hot, 21)
        ck, cv = put(c, cold, 22)
        nk, nv = put(c, new, 23)
        assert tier.place(SPEC, hot, hk, hv) == 16
        assert tier.place(SPEC, cold, ck, cv) == 16
        for _ in range(3):                              # uses make the hot page hot
            assert tier.restore(SPEC, hot) is not None
        assert tier.place(SPEC, new, nk, nv) == 32      # the free slot, then the cold page's
        assert c.lookup_detail(SPEC, hot).vram_tokens == 16
        assert c.lookup_detail(SPEC, cold).vram_tokens == 0
        k, v = tier.restore(SPEC, new)
        assert torch.equal(k.view(torch.int16), nk.view(torch.int16))
        assert torch.equal(v.view(torch.int16), nv.view(torch.int16))


def test_a_placement_released_unwritten_leaves_nothing_resident(daemon):
    tokens = list(range(4000, 4016))
    with kvtier.Client(daemon.socket) as c, vram.VramTier(c) as tier:
        put(c, tokens, 30)
        tier.create_pool("cpu", 1, model=SPEC)
        placement = c.vram_place(SPEC, tier.pool_id, tokens)
        assert placement.lease_id and [p[:2] for p in placement.pages] == [(0, 16)]
        assert c.lookup_detail(SPEC, tokens).vram_tokens == 0   # written, not committed
        c.release(placement.lease_id)
        assert c.lookup_detail(SPEC, tokens).vram_tokens == 0
        again = c.vram_place(SPEC, tier.pool_id, tokens)         # the slot is free again
        assert [p[:2] for p in again.pages] == [(0, 16)]
        c.release(again.lease_id)


def test_pool_registration_is_checked(daemon):
    with kvtier.Client(daemon.socket) as c:
        with pytest.raises(ValueError):
            c.vram_register_pool("", 1, 64, b"x")
        with pytest.raises(ValueError):
            c.vram_register_pool("gpu", 0, 64, b"x")
        with pytest.raises(ValueError):
            c.vram_register_pool("gpu", 1, 64, b"x" * 1025)
        with pytest.raises(kvtier.KVTierError) as e:
            c.vram_place(SPEC, 987654, list(range(16)))         # no such pool
        assert e.value.code == "notFound"
        small = c.vram_register_pool("gpu", 1, 64, b"x")        # slots smaller than a page
        put(c, list(range(5000, 5016)), 40)
        with pytest.raises(kvtier.KVTierError) as e:
            c.vram_place(SPEC, small, list(range(5000, 5016)))
        assert e.value.code == "invalidArgument"


def test_a_pool_is_freed_only_after_its_last_reader_released(daemon):
    tokens = list(range(6000, 6032))
    with kvtier.Client(daemon.socket) as c, kvtier.Client(daemon.socket) as reader:
        keys, values = put(c, tokens, 50)
        tier = vram.VramTier(c)
        tier.create_pool("cpu", 2, model=SPEC)
        assert tier.place(SPEC, tokens, keys, values) == 32
        lease = reader.vram_lease(SPEC, tokens)          # a reader mid-copy
        assert lease.tokens == 32
        path = os.path.join("/dev/shm", tier.pool.handle.ipc.decode())
        assert tier._owner.vram_drop(tier.pool_id) == 1  # out of the directory, one reader left
        assert c.lookup_detail(SPEC, tokens).vram_tokens == 0
        assert reader.vram_lease(SPEC, tokens).tokens == 0
        assert os.path.exists(path)                      # the memory stays while the reader copies
        reader.release(lease.lease_id)
        tier.close()                                     # the next VRAM_DROP answers 0: freed
        assert not os.path.exists(path)
        assert tier.pool is None
