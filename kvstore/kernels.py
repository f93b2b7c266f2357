"""Triton gather/scatter between the paged pool and block-major buffers (one launch each).

Contract (same as ``gather_blocks_torch`` / ``scatter_blocks_torch`` in ``kvstore.pool_copy``):

- pool: ``kv_caches``, a list of ``L`` per-layer tensors ``[num_blocks, 2, block_size, H_kv, D]``,
  each contiguous, same dtype and device.
- block-major buffer: ``[N, L, 2, block_size, H_kv, D]`` with ``N >= n``; the last five dims
  contiguous (row ``i`` may be strided, e.g. a slice of a bigger staging buffer).
- ``block_ids: [n]`` integer, distinct for scatter; row ``i`` of the buffer <-> pool block
  ``block_ids[i]`` of every layer.

How one launch reaches L separate allocations: the kernel gets the first layer's tensor as its
base pointer and a device tensor of per-layer element offsets ``(data_ptr(l) - data_ptr(0)) /
element_size`` (int64, possibly negative). This is plain pointer arithmetic, so it behaves the
same compiled on CUDA and under ``TRITON_INTERPRET=1`` (where kernels run on CPU tensors); no
int-to-pointer cast and no per-layer fallback is needed. Grid: ``(n, L, chunks of a layer-block)``.

This module imports triton at import time; ``kvstore.pool_copy`` imports it lazily (CUDA only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvstore.layout import KVLayout

# Elements per program: 64 KiB of bf16 per layer-block in an 8B-shaped model (2*16*8*128) is
# 32768 elements -> 8 programs per (block, layer).
_CHUNK = 4096
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _gather_scatter_kernel(
    pool_ptr,  # first layer's pool tensor; other layers reached through layer_offs
    layer_offs_ptr,  # [L] int64: element offset of layer l's pool relative to pool_ptr
    buf_ptr,  # block-major buffer [N, L, 2, bs, H, D]
    block_ids_ptr,  # [n] int64 pool block ids
    buf_row_stride,  # elements between buf[i] and buf[i + 1]
    LAYER_NUMEL: tl.constexpr,  # 2 * bs * H * D: one block of one layer
    CHUNK: tl.constexpr,  # elements per program (power of two)
    TO_BUF: tl.constexpr,  # True: gather (pool -> buf); False: scatter (buf -> pool)
):
    row = tl.program_id(0).to(tl.int64)  # index into block_ids / buffer rows
    layer = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2)
    block_id = tl.load(block_ids_ptr + row).to(tl.int64)
    layer_off = tl.load(layer_offs_ptr + layer)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < LAYER_NUMEL
    pool_ptrs = pool_ptr + (layer_off + block_id * LAYER_NUMEL) + offs
    buf_ptrs = buf_ptr + (row * buf_row_stride + layer * LAYER_NUMEL) + offs
    if TO_BUF:
        vals = tl.load(pool_ptrs, mask=mask)
        tl.store(buf_ptrs, vals, mask=mask)
    else:
        vals = tl.load(buf_ptrs, mask=mask)
        tl.store(pool_ptrs, vals, mask=mask)


def _layer_offsets(kv_caches: list[torch.Tensor], layout: KVLayout) -> torch.Tensor:
    """``[L]`` int64 on the pool's device: element offset of each layer from layer 0."""
    base = kv_caches[0]
    esize = base.element_size()
    offs = []
    for layer, cache in enumerate(kv_caches):
        if cache.dtype != layout.dtype or cache.device != base.device:
            raise ValueError(
                f"kv_caches[{layer}] is {cache.dtype} on {cache.device}; every layer must be "
                f"{layout.dtype} on {base.device} (the layout's dtype, one device)"
            )
        if cache.shape[1:] != layout.pool_block_shape() or not cache.is_contiguous():
            raise ValueError(
                f"kv_caches[{layer}] has shape {tuple(cache.shape)} (contiguous="
                f"{cache.is_contiguous()}); expected a contiguous [num_blocks, "
                f"{', '.join(map(str, layout.pool_block_shape()))}] tensor"
            )
        delta = cache.data_ptr() - base.data_ptr()
        assert delta % esize == 0, f"layer {layer} pool is not {esize}-byte aligned vs layer 0"
        offs.append(delta // esize)
    return torch.tensor(offs, dtype=torch.int64).to(base.device, non_blocking=True)


def _launch(
    kv_caches: list[torch.Tensor],
    block_ids: torch.Tensor,
    buf: torch.Tensor,
    layout: KVLayout,
    to_buf: bool,
) -> None:
    """Checks the arguments and runs one kernel launch over all blocks and layers."""
    if layout.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"dtype {layout.dtype} is not supported; use one of {_SUPPORTED_DTYPES}")
    if len(kv_caches) != layout.num_layers:
        raise ValueError(f"got {len(kv_caches)} layer caches, layout has {layout.num_layers}")
    n = block_ids.numel()
    if buf.dim() != 6 or buf.shape[1:] != layout.block_shape or buf.shape[0] < n:
        raise ValueError(
            f"block-major buffer has shape {tuple(buf.shape)}; expected [>= {n}, "
            f"{', '.join(map(str, layout.block_shape))}]"
        )
    if buf.dtype != layout.dtype or buf.device != kv_caches[0].device:
        raise ValueError(
            f"buffer is {buf.dtype} on {buf.device}; it must be {layout.dtype} on "
            f"{kv_caches[0].device} (copy it to the pool's device first)"
        )
    if not buf[0].is_contiguous():
        raise ValueError("each row of the block-major buffer must be contiguous")
    if n == 0:
        return
    num_blocks = kv_caches[0].shape[0]
    if block_ids.device.type == "cpu":  # cheap range check; a device tensor is trusted
        lo, hi = int(block_ids.min()), int(block_ids.max())
        if lo < 0 or hi >= num_blocks:
            raise ValueError(f"block_ids span [{lo}, {hi}] but the pool has {num_blocks} blocks")
    layer_offs = _layer_offsets(kv_caches, layout)
    ids = block_ids.to(device=buf.device, dtype=torch.int64, non_blocking=True).contiguous()
    layer_numel = layout.block_numel // layout.num_layers
    chunk = min(_CHUNK, triton.next_power_of_2(layer_numel))
    grid = (n, layout.num_layers, triton.cdiv(layer_numel, chunk))
    _gather_scatter_kernel[grid](
        kv_caches[0],
        layer_offs,
        buf,
        ids,
        buf.stride(0),
        LAYER_NUMEL=layer_numel,
        CHUNK=chunk,
        TO_BUF=to_buf,
    )


def gather_blocks_triton(
    kv_caches: list[torch.Tensor], block_ids: torch.Tensor, out: torch.Tensor, layout: KVLayout
) -> torch.Tensor:
    """Pool -> block-major in one launch. ``out: [N>=n, L, 2, bs, H, D]``; ``block_ids: [n]``.

    ``out[i, l] = kv_caches[l][block_ids[i]]`` for ``i < n``; rows ``>= n`` are untouched.
    Returns ``out``. Asynchronous on CUDA (stream-ordered like any kernel).
    """
    _launch(kv_caches, block_ids, out, layout, to_buf=True)
    return out


def scatter_blocks_triton(
    kv_caches: list[torch.Tensor], block_ids: torch.Tensor, src: torch.Tensor, layout: KVLayout
) -> None:
    """Block-major -> pool in one launch. ``src: [N>=n, L, 2, bs, H, D]``; ``block_ids: [n]``.

    ``kv_caches[l][block_ids[i]] = src[i, l]`` for ``i < n``. ``block_ids`` must be distinct
    (with duplicates the winner is unspecified, as with ``index_copy_``).
    """
    _launch(kv_caches, block_ids, src, layout, to_buf=False)
