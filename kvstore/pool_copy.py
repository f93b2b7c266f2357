"""Copies between the paged pool and block-major buffers (the layouts of ``kvstore.layout``).

``gather_blocks`` / ``scatter_blocks`` convert many blocks at once: indexed copies in torch (the
CPU path, and the reference: ``gather_blocks_torch`` / ``scatter_blocks_torch``), or one Triton
kernel on CUDA (``kvstore.kernels``, imported lazily: triton is loaded only where it runs).
"""

from __future__ import annotations

import torch

from kvstore.layout import KVLayout


def _check(kv_caches: list[torch.Tensor], layout: KVLayout, buf: torch.Tensor, n: int) -> None:
    assert len(kv_caches) == layout.num_layers, (len(kv_caches), layout)
    assert buf.shape[0] >= n and buf.shape[1:] == layout.block_shape, (buf.shape, layout)


def gather_blocks_torch(
    kv_caches: list[torch.Tensor], block_ids: torch.Tensor, out: torch.Tensor, layout: KVLayout
) -> torch.Tensor:
    """Pool -> block-major. ``out: [n, L, 2, bs, H, D]``; ``block_ids: [n]`` (int64)."""
    n = block_ids.numel()
    _check(kv_caches, layout, out, n)
    idx = block_ids.to(kv_caches[0].device)
    for layer, cache in enumerate(kv_caches):
        # cache: [num_blocks, 2, bs, H, D] -> out[:, layer]: [n, 2, bs, H, D]
        out[:n, layer].copy_(cache.index_select(0, idx), non_blocking=True)
    return out


def scatter_blocks_torch(
    kv_caches: list[torch.Tensor], block_ids: torch.Tensor, src: torch.Tensor, layout: KVLayout
) -> None:
    """Block-major -> pool. ``src: [n, L, 2, bs, H, D]`` on the pool's device."""
    n = block_ids.numel()
    _check(kv_caches, layout, src, n)
    idx = block_ids.to(kv_caches[0].device)
    for layer, cache in enumerate(kv_caches):
        cache.index_copy_(0, idx, src[:n, layer])


def gather_blocks(
    kv_caches: list[torch.Tensor], block_ids: torch.Tensor, out: torch.Tensor, layout: KVLayout
) -> torch.Tensor:
    """Pool -> block-major, the Triton kernel on CUDA, indexed copies elsewhere."""
    if kv_caches[0].is_cuda and out.is_cuda:
        from kvstore.kernels import gather_blocks_triton

        gather_blocks_triton(kv_caches, block_ids, out, layout)
        return out
    return gather_blocks_torch(kv_caches, block_ids, out, layout)


def scatter_blocks(
    kv_caches: list[torch.Tensor], block_ids: torch.Tensor, src: torch.Tensor, layout: KVLayout
) -> None:
    if kv_caches[0].is_cuda and src.is_cuda:
        from kvstore.kernels import scatter_blocks_triton

        scatter_blocks_triton(kv_caches, block_ids, src, layout)
        return
    scatter_blocks_torch(kv_caches, block_ids, src, layout)
