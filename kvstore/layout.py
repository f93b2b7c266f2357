"""KV layouts: the engine's paged pool and block-major buffers.

- Pool (owned by the engine): one tensor per layer, ``[num_blocks, 2, block_size, H_kv, D]``.
- Block-major (host, disk, wire): ``[num_layers, 2, block_size, H_kv, D]`` contiguous in the
  model dtype, so one block is one buffer. ``block_nbytes`` bytes each.

``gather_blocks`` / ``scatter_blocks`` convert many blocks at once: indexed copies in torch (the
CPU path, and the reference), or one Triton kernel on CUDA (``kvstore.kernels``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IO_ALIGN = 4096  # O_DIRECT alignment of disk offsets, lengths and buffers (a page)


@dataclass(frozen=True)
class KVLayout:
    num_layers: int  # decoder layers
    block_size: int  # tokens per block
    num_kv_heads: int  # key/value heads (after GQA)
    head_dim: int  # per-head dimension
    dtype: torch.dtype  # model dtype of K and V

    def __post_init__(self) -> None:
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVLayout.{name} must be positive, got {getattr(self, name)}")

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_numel(self) -> int:
        return math.prod(self.block_shape)

    @property
    def block_nbytes(self) -> int:
        return self.block_numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        return self.block_nbytes // self.block_size

    def pool_block_shape(self) -> tuple[int, int, int, int]:
        """Shape of one block inside one layer of the pool: ``[2, block_size, H_kv, D]``."""
        return (2, self.block_size, self.num_kv_heads, self.head_dim)


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


def aligned_empty(rows: int, row_nbytes: int) -> torch.Tensor:
    """uint8 ``[rows, row_nbytes]`` on the CPU whose first byte is ``IO_ALIGN``-aligned (so is
    every row when ``row_nbytes`` is a multiple of it): disk reads land in such rows with
    ``O_DIRECT``, no bounce copy."""
    nbytes = rows * row_nbytes
    raw = torch.empty(nbytes + IO_ALIGN, dtype=torch.uint8)
    offset = (-raw.data_ptr()) % IO_ALIGN
    return raw[offset : offset + nbytes].view(rows, row_nbytes)
