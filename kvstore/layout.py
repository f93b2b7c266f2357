"""KV layouts: the engine's paged pool and block-major buffers.

- Pool (owned by the engine): one tensor per layer, ``[num_blocks, 2, block_size, H_kv, D]``.
- Block-major (host, disk, wire): ``[num_layers, 2, block_size, H_kv, D]`` contiguous in the
  model dtype, so one block is one buffer. ``block_nbytes`` bytes each.

Copies between the two: ``kvstore.pool_copy``.
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


def aligned_empty(rows: int, row_nbytes: int) -> torch.Tensor:
    """uint8 ``[rows, row_nbytes]`` on the CPU whose first byte is ``IO_ALIGN``-aligned (so is
    every row when ``row_nbytes`` is a multiple of it): disk reads land in such rows with
    ``O_DIRECT``, no bounce copy."""
    nbytes = rows * row_nbytes
    raw = torch.empty(nbytes + IO_ALIGN, dtype=torch.uint8)
    offset = (-raw.data_ptr()) % IO_ALIGN
    return raw[offset : offset + nbytes].view(rows, row_nbytes)
