"""One Triton GEMM with one fixed configuration: ``x @ weight.T (+ bias)``, batch-invariant.

Every output tile sums over K in ``BLOCK_K`` steps from 0 upwards with one ``tl.dot`` shape,
whatever ``M`` is (``M`` is not even specialised on), and there is no split-K: a row's result
is the same in a batch of 1 and a batch of 4096. Used by ``engine.matmul`` in deterministic
mode on CUDA; on CPU tensors it runs under ``TRITON_INTERPRET=1`` (tests, small shapes).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M = 64, 64, 64, 8


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(
    a_ptr,  # [M, K]
    w_ptr,  # [N, K]
    bias_ptr,  # [N] (read when HAS_BIAS)
    c_ptr,  # [M, N]
    M,
    N,
    K,
    stride_am,
    stride_wn,
    stride_cm,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_F32: tl.constexpr,  # the interpreter's bf16 dot is wrong: upcast there (tests only)
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no tf32)
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped order: consecutive programs share weight columns in L2
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + rk) < K
        a = tl.load(a_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def linear_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    # x: [M, K]; weight: [N, K]; bias: [N] -> [M, N] in x's dtype
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not multiply")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight need a contiguous last dim")
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    grid = (triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N),)
    interp_bf16 = os.environ.get("TRITON_INTERPRET") == "1" and x.dtype == torch.bfloat16
    _matmul_kernel[grid](
        x, weight, bias if bias is not None else weight, out, m, n, k, x.stride(0),
        weight.stride(0), out.stride(0), HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M, DOT_F32=interp_bf16,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 or interp_bf16 else None,
        num_warps=4, num_stages=3,
    )  # fmt: skip
    return out
