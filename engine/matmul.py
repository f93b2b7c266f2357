"""Batch-invariant projections: a row's result does not depend on the rows batched with it.

A GEMM library picks its kernel (tile shapes, split of the reduction) from the matrix shape, so
the same token can get different low bits in a batch of 1 and a batch of 64: in bf16 that is
enough to flip a near-tied greedy token. ``engine: {deterministic: true}`` runs every
projection through ``invariant_linear``:

- CUDA: ``engine.matmul_triton``, one Triton kernel with one fixed configuration (tile sizes,
  a K loop in one fixed order, no split-K) whatever the row count: the sum behind every output
  element is the same sequence of operations in any batch. It gives up cuBLAS's per-shape
  tuning; ``strata bench gpu`` (section ``determinism``) measures what that costs.
- CPU: ``torch.nn.functional.linear`` with the rows padded to a multiple of ``ROW_TILE``.
  Measured with torch 2.13 (oneDNN, bf16 and float32, shapes of tiny / smollm2 / the 8B): a
  row's bits are the same for every row count and offset except for a single row, which takes
  a matrix-vector path with another summation order; padding never sends one row.
  ``tests/engine/test_determinism.py`` checks the engine's batches on this machine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ROW_TILE = 16


def invariant_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    # x: [T, K]; weight: [N, K] -> [T, N]
    if x.is_cuda:
        from engine.matmul_triton import linear_triton

        return linear_triton(x, weight, bias)
    t = x.shape[0]
    pad = (-t) % ROW_TILE
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return F.linear(x, weight, bias)[:t]
