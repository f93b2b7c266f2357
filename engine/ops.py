"""The decoder's per-token ops in two forms: torch (every CPU run) and fused Triton kernels.

- ``rms_norm(x, w, eps, residual)``: RMSNorm, with the residual add folded in (the layer's
  ``x + attn(x)`` and the next norm are one launch): returns ``(normed, x + residual)``.
- ``silu_mul(gate_up)``: ``silu(gate) * up`` over the merged gate-up projection's output.
- ``rope_write_kv(qkv, ...)``: RoPE on q and k and the KV-cache write, one launch.
- ``linear(x, w, b, invariant)``: a projection; ``invariant`` gives every row the numbers it
  would get in any other batch (``engine.matmul``).

``fused=True`` (``AttnMetadata.fused``: on CUDA with Triton) picks the kernels of
``engine.ops_triton``; the torch forms are the reference and keep the numerics the engine
always had on CPU. A row's result depends only on that row in both forms (for the torch forms
on CPU this is what ``tests/engine/test_determinism.py`` checks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.rope import apply_rope


def rms_norm(
    x: torch.Tensor,  # [T, N]
    weight: torch.Tensor,  # [N]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, N]
    *,
    fused: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if fused:
        from engine.ops_triton import rms_norm as rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    if residual is not None:
        x = x + residual
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype), (x if residual is not None else None)


def silu_mul(gate_up: torch.Tensor, *, fused: bool = False) -> torch.Tensor:
    # gate_up: [T, 2N] -> [T, N]
    if fused:
        from engine.ops_triton import silu_mul as silu_mul_triton

        return silu_mul_triton(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_write_kv(
    qkv: torch.Tensor,  # [T, (H_q + 2 H_kv) * D]
    cos: torch.Tensor,  # [T, 1, D]
    sin: torch.Tensor,  # [T, 1, D]
    cache: torch.Tensor,  # [num_blocks, 2, bs, H_kv, D]
    slot_block: torch.Tensor,  # [T] int64
    slot_offset: torch.Tensor,  # [T] int64
    num_heads: int,
    num_kv_heads: int,
    *,
    fused: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k (rotated) and v, ``[T, H, D]`` each; k and v are in the cache afterwards."""
    t, d = qkv.shape[0], cache.shape[-1]
    q_end, k_end = num_heads * d, (num_heads + num_kv_heads) * d
    if fused:
        from engine.ops_triton import rope_write_kv as rope_write_kv_triton

        rope_write_kv_triton(qkv, cos.view(t, d), sin.view(t, d), cache, slot_block,
                             slot_offset, num_heads, num_kv_heads)  # fmt: skip
        q = qkv[:, :q_end].view(t, num_heads, d)
        k = qkv[:, q_end:k_end].view(t, num_kv_heads, d)
    else:
        q = apply_rope(qkv[:, :q_end].view(t, num_heads, d), cos, sin)
        k = apply_rope(qkv[:, q_end:k_end].view(t, num_kv_heads, d), cos, sin)
    v = qkv[:, k_end:].view(t, num_kv_heads, d)
    if not fused:
        cache[slot_block, 0, slot_offset] = k
        cache[slot_block, 1, slot_offset] = v
    return q, k, v


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    *, invariant: bool = False,
) -> torch.Tensor:  # fmt: skip
    # x: [T, K]; weight: [N, K] -> [T, N]
    if invariant:
        from engine.matmul import invariant_linear

        return invariant_linear(x, weight, bias)
    return F.linear(x, weight, bias)
