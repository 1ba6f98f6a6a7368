"""Copies between vLLM's paged KV cache and KVTier pages.

A KVTier page of ``t`` tokens is ``[layers, 2, t, kv_heads, head_dim]`` (docs/protocol.md); vLLM
keeps each layer in blocks of ``block_size`` tokens, laid out as its attention backend wants.
``PagedKV`` wraps the layer tensors that vLLM registers and exposes, per layer, keys and values
as ``[kernel_blocks, kernel_block_size, kv_heads, head_dim]`` strided views, so that both
directions are one strided ``copy_`` per kernel block and layer, with no temporary.

Backend layouts (vLLM 0.32, per-layer logical shape ``[B, H, N, C]``, RFC #42082):

- CPU attention: ``[blocks, kv_heads, block, 2 * head_dim]`` whose memory is, per block and
  head, the ``[block, head_dim]`` keys followed by the values (the backend views it as
  ``[blocks, kv_heads, 2 * block, head_dim]`` and splits dim 2).
- CUDA/ROCm backends (flash-attn, triton, flashinfer): the same logical shape with keys and
  values split along the last dimension.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

import torch

# Page views of the daemon's read-only arena become read-only tensors: torch warns once per
# process that writing them is undefined. We only read them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def _layer_order(names: Sequence[str]) -> List[str]:
    def index(name: str) -> int:
        numbers = [int(part) for part in name.split(".") if part.isdigit()]
        if len(numbers) != 1:
            raise ValueError(f"kvtier: cannot tell the layer index of attention layer {name!r}")
        return numbers[0]

    return sorted(names, key=index)


class PagedKV:
    """The paged KV cache of one vLLM worker, as KVTier sees it.

    ``kv_caches``: vLLM's ``{layer_name: tensor}``; ``num_blocks``: the KV cache manager's block
    count (a layer tensor may hold a multiple: kernel blocks); ``block_size``: tokens per manager
    block; ``split``: ``"cpu"`` or ``"last-dim"`` (see the module doc).
    """

    def __init__(self, kv_caches: Dict[str, torch.Tensor], num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, split: str, stage_pages: Optional[bool] = None):
        if not kv_caches:
            raise ValueError("kvtier: vLLM registered no KV cache tensors")
        self.layer_names = _layer_order(list(kv_caches))
        self.block_size = block_size
        self.keys: List[torch.Tensor] = []
        self.values: List[torch.Tensor] = []
        ratio = None
        for name in self.layer_names:
            kv = kv_caches[name]
            if kv.element_size() != 2:
                raise ValueError(f"kvtier: layer {name} holds {kv.dtype}; KVTier pages hold 16-bit float16/bfloat16 KV "
                                 "(a quantized KV cache such as fp8 cannot be offloaded bit-exact)")
            if kv.dim() != 4 or kv.shape[0] % num_blocks:
                raise ValueError(f"kvtier: layer {name} has shape {tuple(kv.shape)}; expected [blocks, kv_heads, block, "
                                 f"2 * head_dim] with a multiple of {num_blocks} blocks")
            r = kv.shape[0] // num_blocks
            kernel_block = block_size // r
            if ratio is None:
                ratio = r
            if r != ratio or kernel_block * r != block_size or tuple(kv.shape[1:]) != (kv_heads, kernel_block, 2 * head_dim):
                raise ValueError(f"kvtier: layer {name} has shape {tuple(kv.shape)}, not [{num_blocks}×{r}, {kv_heads}, "
                                 f"{kernel_block}, {2 * head_dim}] as the KV cache spec says")
            bits = kv.view(torch.int16)
            if split == "cpu":
                if not kv.is_contiguous():
                    raise ValueError(f"kvtier: layer {name} is not contiguous; the CPU backend's layout is")
                halves = bits.view(kv.shape[0], kv_heads, 2, kernel_block, head_dim)
                k, v = halves[:, :, 0], halves[:, :, 1]
            elif split == "last-dim":
                k, v = bits[..., :head_dim], bits[..., head_dim:]
            else:
                raise ValueError(f"kvtier: unknown KV split {split!r}")
            # [kernel blocks, heads, block, dim] -> [kernel blocks, block, heads, dim]
            self.keys.append(k.transpose(1, 2))
            self.values.append(v.transpose(1, 2))
        self.ratio = ratio or 1
        self.kernel_block = block_size // self.ratio
        self.device = self.keys[0].device
        #: Whether a loaded page crosses to the KV's device in one contiguous copy first (then
        #: scattered there): the default off the CPU, where the strided per-block copies would
        #: each be a small transfer from pageable memory.
        self.stage_pages = self.device.type != "cpu" if stage_pages is None else stage_pages
        self._staging = None

    @property
    def layers(self) -> int:
        return len(self.layer_names)

    def _runs(self, block_ids: Sequence[int], a: int, b: int):
        """(kernel block, offset in it, tokens, offset in the range) covering tokens a..<b."""
        kb = self.kernel_block
        p = a
        while p < b:
            manager, within = divmod(p, self.block_size)
            sub, offset = divmod(within, kb)
            n = min(kb - offset, b - p)
            yield block_ids[manager] * self.ratio + sub, offset, n, p - a
            p += n

    def gather(self, block_ids: Sequence[int], a: int, b: int, dest: np.ndarray) -> None:
        """Writes tokens ``a..<b`` of a request whose blocks are ``block_ids`` into ``dest``, a
        ``[layers, 2, b - a, heads, dim]`` uint16 page buffer."""
        self.gather_tensor(block_ids, a, b, torch.from_numpy(dest.view(np.int16)))

    def gather_tensor(self, block_ids: Sequence[int], a: int, b: int, out: torch.Tensor) -> None:
        """``gather`` into an int16 tensor ``[layers, 2, b - a, heads, dim]`` (strides allowed),
        e.g. a VRAM pool's slot on the KV's device: device-to-device copies, asynchronous on CUDA."""
        runs = list(self._runs(block_ids, a, b))
        asynchronous = out.device.type != "cpu"  # a copy into host memory completes before returning
        for layer in range(self.layers):
            keys, values = self.keys[layer], self.values[layer]
            out_k, out_v = out[layer, 0], out[layer, 1]
            for block, offset, n, at in runs:
                out_k[at:at + n].copy_(keys[block, offset:offset + n], non_blocking=asynchronous)
                out_v[at:at + n].copy_(values[block, offset:offset + n], non_blocking=asynchronous)

    def scatter(self, block_ids: Sequence[int], a: int, page: np.ndarray, first: int) -> None:
        """Copies a page holding tokens ``a..<a + t`` into the request's blocks, skipping tokens
        before ``first`` (already computed by vLLM). Synchronous: the page is a view of the
        daemon's arena that its lease protects only until the caller returns."""
        t = page.shape[2]
        if max(a, first) >= a + t:
            return
        src = torch.from_numpy(page.view(np.int16))
        if self.stage_pages:
            src = self._stage(src)
        self.scatter_tensor(block_ids, a, src, first)
        if self.stage_pages and self.device.type == "cuda":
            # The page's lease ends when we return: the upload must be done (the scatter after
            # it reads the staging buffer in stream order, before the next page's upload).
            torch.cuda.current_stream(self.device).synchronize()

    def scatter_tensor(self, block_ids: Sequence[int], a: int, src: torch.Tensor, first: int) -> None:
        """``scatter`` from an int16 tensor ``[layers, 2, t, heads, dim]`` (strides allowed) on
        the KV's device, e.g. a VRAM pool's slot: device-to-device copies, asynchronous on CUDA
        (the caller synchronizes before the source may change)."""
        t = src.shape[2]
        lo = max(a, first)
        if lo >= a + t:
            return
        runs = list(self._runs(block_ids, lo, a + t))
        skip = lo - a
        asynchronous = src.device.type != "cpu"  # from host memory (the arena): done before returning
        for layer in range(self.layers):
            keys, values = self.keys[layer], self.values[layer]
            src_k, src_v = src[layer, 0], src[layer, 1]
            for block, offset, n, at in runs:
                keys[block, offset:offset + n].copy_(src_k[skip + at:skip + at + n], non_blocking=asynchronous)
                values[block, offset:offset + n].copy_(src_v[skip + at:skip + at + n], non_blocking=asynchronous)

    def _stage(self, src: torch.Tensor) -> torch.Tensor:
        """``src`` (a host page) in a reused buffer on the KV's device, by one copy."""
        n = src.numel()
        if self._staging is None or self._staging.numel() < n:
            self._staging = torch.empty(n, dtype=torch.int16, device=self.device)
        staged = self._staging[:n].view(src.shape)
        if not src.is_contiguous():
            src = src.contiguous()
        staged.copy_(src, non_blocking=self.device.type == "cuda")
        return staged


def blocks_of(block_ids: Sequence[int], block_size: int, a: int, b: int) -> Tuple[int, ...]:
    """The manager blocks holding tokens ``a..<b``."""
    if b <= a:
        return ()
    return tuple(block_ids[a // block_size:(b - 1) // block_size + 1])
