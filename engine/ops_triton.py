"""Triton kernels of the decoder's per-token ops: RMSNorm with the residual add, SiLU-and-mul,
and RoPE fused with the KV-cache write. One launch each where the torch forms take 3-8.

Every kernel works on one token (one row) per program, so a row's numbers never depend on the
other rows of the batch (batch-invariant by construction). Rounding follows the torch forms in
``engine.ops`` (and Hugging Face's): a residual sum is rounded to the model dtype before it is
normalised, the normalised row is rounded before the weight multiplies it, SiLU is rounded
before the product. Run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, N]
    res_ptr,  # [T, N] residual (read when HAS_RES)
    w_ptr,  # [N]
    out_ptr,  # [T, N]
    res_out_ptr,  # [T, N] x + residual (written when HAS_RES)
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    n_cols,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / n_cols
    y = (xf * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    y = (y.to(tl.float32) * w.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + offs, y, mask=mask)


def rms_norm(
    x: torch.Tensor,  # [T, N]
    weight: torch.Tensor,  # [N]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, N]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight * normalise(x + residual), x + residual)``; without a residual ``(.., None)``."""
    t, n = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else out
    res_in = residual if residual is not None else x
    if t:
        _rms_norm_kernel[(t,)](
            x, res_in, weight, out, res_out, x.stride(0), res_in.stride(0), out.stride(0),
            res_out.stride(0), n, eps, HAS_RES=residual is not None,
            BLOCK=triton.next_power_of_2(n), num_warps=4 if n <= 2048 else 8,
        )  # fmt: skip
    return out, (res_out if residual is not None else None)


@triton.jit
def _silu_mul_kernel(
    gu_ptr,  # [T, 2 * N]: gate then up
    out_ptr,  # [T, N]
    stride_gu,
    stride_o,
    n_cols,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    g = tl.load(gu_ptr + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + n_cols + offs, mask=mask, other=0.0)
    s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty)
    y = (s.to(tl.float32) * u.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + offs, y, mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up = [gate | up]``: ``[T, 2N] -> [T, N]``."""
    t, n2 = gate_up.shape
    n = n2 // 2
    out = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(n))
    if t:
        _silu_mul_kernel[(t, triton.cdiv(n, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block
        )
    return out


@triton.jit
def _rope_kv_kernel(
    qkv_ptr,  # [T, (H_q + 2 H_kv) * D]: q heads, k heads, v heads; q and k rotated in place
    cos_ptr,  # [T, D] (the two halves equal)
    sin_ptr,  # [T, D]
    slot_block_ptr,  # [T] int64: pool block of each token
    slot_offset_ptr,  # [T] int64: offset inside it
    cache_ptr,  # [num_blocks, 2, bs, H_kv, D]
    stride_t,
    stride_cos,
    stride_cb,
    stride_ckv,
    stride_ct,
    stride_ch,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,  # >= max(H_q, H_kv), a power of two
    BLOCK_HALF: tl.constexpr,  # >= HALF, a power of two
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    d_mask = offs < HALF
    cos = tl.load(cos_ptr + t * stride_cos + offs, mask=d_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_cos + offs, mask=d_mask, other=0.0).to(tl.float32)
    heads = tl.arange(0, BLOCK_H)
    row = qkv_ptr + t * stride_t
    # q heads, rotated in place
    m = (heads < NUM_HEADS)[:, None] & d_mask[None, :]
    p1 = row + heads[:, None] * HEAD_DIM + offs[None, :]
    x1 = tl.load(p1, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=m, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(qkv_ptr.dtype.element_ty), mask=m)
    tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(qkv_ptr.dtype.element_ty), mask=m)
    # k heads: rotated in place and written to the cache; v heads: written to the cache
    m = (heads < NUM_KV_HEADS)[:, None] & d_mask[None, :]
    p1 = row + (NUM_HEADS + heads[:, None]) * HEAD_DIM + offs[None, :]
    x1 = tl.load(p1, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=m, other=0.0).to(tl.float32)
    k1 = (x1 * cos - x2 * sin).to(qkv_ptr.dtype.element_ty)
    k2 = (x2 * cos + x1 * sin).to(qkv_ptr.dtype.element_ty)
    tl.store(p1, k1, mask=m)
    tl.store(p1 + HALF, k2, mask=m)
    block = tl.load(slot_block_ptr + t)
    off = tl.load(slot_offset_ptr + t)
    c = cache_ptr + block * stride_cb + off * stride_ct + heads[:, None] * stride_ch + offs[None, :]
    tl.store(c, k1.to(cache_ptr.dtype.element_ty), mask=m)
    tl.store(c + HALF, k2.to(cache_ptr.dtype.element_ty), mask=m)
    pv = row + (NUM_HEADS + NUM_KV_HEADS + heads[:, None]) * HEAD_DIM + offs[None, :]
    tl.store(c + stride_ckv, tl.load(pv, mask=m, other=0.0), mask=m)
    tl.store(c + stride_ckv + HALF, tl.load(pv + HALF, mask=m, other=0.0), mask=m)


def rope_write_kv(
    qkv: torch.Tensor,  # [T, (H_q + 2 H_kv) * D], rotated in place
    cos: torch.Tensor,  # [T, D]
    sin: torch.Tensor,  # [T, D]
    cache: torch.Tensor,  # [num_blocks, 2, bs, H_kv, D]
    slot_block: torch.Tensor,  # [T] int64
    slot_offset: torch.Tensor,  # [T] int64
    num_heads: int,
    num_kv_heads: int,
) -> None:
    """Rotate q and k of every token in place and write its k and v into its pool slot."""
    t = qkv.shape[0]
    head_dim = cache.shape[-1]
    if qkv.stride(1) != 1 or cos.stride(1) != 1 or cache.stride(-1) != 1:
        raise ValueError("qkv, cos/sin and the cache need a contiguous last dim")
    if t:
        _rope_kv_kernel[(t,)](
            qkv, cos, sin, slot_block, slot_offset, cache, qkv.stride(0), cos.stride(0),
            *cache.stride()[:4], NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
            HEAD_DIM=head_dim, HALF=head_dim // 2,
            BLOCK_H=triton.next_power_of_2(max(num_heads, num_kv_heads)),
            BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        )  # fmt: skip
