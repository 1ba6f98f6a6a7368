"""kvtier.torch: tensor conversion (skipped without torch)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kvtier  # noqa: E402
from kvtier.torch import get_tensors, put_tensors  # noqa: E402

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
