"""Paged attention in Triton: split-K decode and causal chunked prefill over the paged KV pool.

KV cache of one layer: ``[num_blocks, 2, block_size, H_kv, D]`` (index 0 = K, 1 = V). Block
tables map a sequence's logical block ``j`` (tokens ``j*bs .. j*bs+bs-1``) to a pool block id;
entries past the sequence's last block are padding (any value, never read). GQA: query head
``h`` reads kv head ``h // (H_q // H_kv)``. Scores and softmax in float32; outputs in q's dtype.

- ``paged_decode_attention``: one new query token per sequence (its K/V already in the cache).
  Flash-decoding: each program handles one (sequence, kv head, partition of ``partition_size``
  context tokens) with all the query heads of its GQA group, writes a partial (max, sum, acc),
  and a second kernel merges the partitions, so one long sequence spreads over many SMs.
- ``paged_prefill_attention`` / ``paged_prefill_attention_varlen``: a chunk of ``T`` queries at
  positions ``q_start .. q_start+T-1`` over the cached prefix plus the chunk itself (its K/V
  already in the cache), causal: position ``p`` attends keys ``0..p``.
- ``*_ref``: plain torch references (gather, repeat for GQA, masked float32 softmax) used by the
  tests and the benchmark; independent of the kernels.

Kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests). This module
imports triton; ``engine`` never imports it on the CPU path.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    q,  # [M, BLOCK_D] queries (M = query heads of a group, or query rows)
    m_i,  # [M] float32 running max (log2 domain)
    l_i,  # [M] float32 running sum
    acc,  # [M, BLOCK_D] float32 running sum of p * V
    cache_ptr,  # [num_blocks, 2, bs, H_kv, D]
    bt_row,  # this sequence's block-table row
    toks,  # [BLOCK_N] token positions of this tile
    t_mask,  # [BLOCK_N] positions that exist
    visible,  # [M, BLOCK_N] which scores count
    kvh,  # kv head
    offs_d,  # [BLOCK_D]
    d_mask,  # [BLOCK_D]
    qk_scale,
    stride_cb,
    stride_ckv,
    stride_ct,
    stride_ch,
    BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """One online-softmax step over a tile of paged keys; returns the new (m_i, l_i, acc)."""
    page = tl.load(bt_row + toks // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
    kv_off = page * stride_cb + (toks % BLOCK_SIZE) * stride_ct + kvh * stride_ch  # [BN]
    kv_ptrs = cache_ptr + kv_off[:, None] + offs_d[None, :]  # [BN, BD] K; + stride_ckv: V
    kv_mask = t_mask[:, None] & d_mask[None, :]
    k = tl.load(kv_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(kv_ptrs + stride_ckv, mask=kv_mask, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, BN]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_partial_kernel(
    q_ptr,  # [B, H_q, D]
    cache_ptr,  # [num_blocks, 2, bs, H_kv, D]
    block_tables_ptr,  # [B, max_blocks] int32
    context_lens_ptr,  # [B] int32
    m_ptr,  # [B, H_q, P] float32: running max (log2 domain) per partition
    l_ptr,  # [B, H_q, P] float32: sum of exp2(s - m) per partition
    acc_ptr,  # [B, H_q, P, D] float32: un-normalised sum of p * V per partition
    qk_scale,  # scale * log2(e)
    stride_qb,
    stride_qh,
    stride_cb,
    stride_ckv,
    stride_ct,
    stride_ch,
    stride_bt,
    num_heads_q,
    num_partitions,
    GROUP: tl.constexpr,  # H_q // H_kv
    BLOCK_H: tl.constexpr,  # GROUP padded to a power of two >= 16 (tl.dot minimum)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per KV block
    BLOCK_N: tl.constexpr,  # tokens per inner iteration
    PARTITION: tl.constexpr,  # tokens per program (multiple of BLOCK_N)
    DOT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,  # upcast dot operands to float32 (interpreter bf16 only)
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + b)
    start = part * PARTITION
    if start < ctx:
        end = tl.minimum(start + PARTITION, ctx)
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        h_mask = offs_h < GROUP
        d_mask = offs_d < HEAD_DIM
        heads = kvh * GROUP + offs_h  # [BLOCK_H] query heads of this kv head
        q_ptrs = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=h_mask[:, None] & d_mask[None, :], other=0.0)  # [BH, BD]
        if DOT_F32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
        for n0 in range(start, end, BLOCK_N):
            toks = n0 + tl.arange(0, BLOCK_N)
            t_mask = toks < end
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, cache_ptr, bt_row, toks, t_mask, t_mask[None, :], kvh,
                offs_d, d_mask, qk_scale, stride_cb, stride_ckv, stride_ct, stride_ch,
                BLOCK_SIZE, DOT_PRECISION, DOT_F32,
            )  # fmt: skip
        row = (b.to(tl.int64) * num_heads_q + heads) * num_partitions + part  # [BH]
        tl.store(m_ptr + row, m_i, mask=h_mask)
        tl.store(l_ptr + row, l_i, mask=h_mask)
        acc_ptrs = acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(acc_ptrs, acc, mask=h_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_reduce_kernel(
    m_ptr,
    l_ptr,
    acc_ptr,  # partials, see _decode_partial_kernel
    out_ptr,  # [B, H_q, D]
    context_lens_ptr,  # [B] int32
    stride_ob,
    stride_oh,
    num_heads_q,
    num_partitions,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PARTITION: tl.constexpr,
    BLOCK_P: tl.constexpr,  # partitions merged per iteration
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.load(context_lens_ptr + b)
    num_parts = tl.cdiv(ctx, PARTITION)  # partitions this sequence actually wrote
    base = (b.to(tl.int64) * num_heads_q + h) * num_partitions
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_tot = tl.full([], float("-inf"), tl.float32)
    l_tot = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for p0 in range(0, num_parts, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_mask = offs_p < num_parts
        m = tl.load(m_ptr + base + offs_p, mask=p_mask, other=float("-inf"))
        l_part = tl.load(l_ptr + base + offs_p, mask=p_mask, other=0.0)
        a_ptrs = acc_ptr + (base + offs_p)[:, None] * HEAD_DIM + offs_d[None, :]
        a = tl.load(a_ptrs, mask=p_mask[:, None] & d_mask[None, :], other=0.0)  # [BP, BD]
        m_new = tl.maximum(m_tot, tl.max(m, 0))
        alpha = tl.exp2(m_tot - m_new)
        w = tl.exp2(m - m_new)  # [BP]; 0 for masked partitions
        l_tot = l_tot * alpha + tl.sum(l_part * w, 0)
        acc = acc * alpha + tl.sum(a * w[:, None], 0)
        m_tot = m_new
    out = acc / tl.where(l_tot > 0, l_tot, 1.0)  # a zero-length context gives zeros
    out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _prefill_kernel(
    q_ptr,  # [total_T, H_q, D]
    cache_ptr,  # [num_blocks, 2, bs, H_kv, D]
    block_tables_ptr,  # [B, max_blocks] int32
    cu_q_lens_ptr,  # [B + 1] int32: sequence b's queries are rows cu[b] .. cu[b+1]-1
    q_starts_ptr,  # [B] int32: position of sequence b's first query
    out_ptr,  # [total_T, H_q, D]
    qk_scale,  # scale * log2(e)
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_ckv,
    stride_ct,
    stride_ch,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per inner iteration
    DOT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,  # upcast dot operands to float32 (interpreter bf16 only)
):
    m_tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_begin = tl.load(cu_q_lens_ptr + b)
    q_len = tl.load(cu_q_lens_ptr + b + 1) - q_begin
    if m_tile * BLOCK_M < q_len:
        q_start = tl.load(q_starts_ptr + b)
        kvh = h // GROUP
        offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < q_len
        d_mask = offs_d < HEAD_DIM
        pos = q_start + offs_m  # [BM] absolute positions of the queries
        rows = (q_begin + offs_m).to(tl.int64)
        q_ptrs = q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BM, BD]
        if DOT_F32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # keys beyond the tile's last query position are masked for every row: stop there.
        # Key 0 is in the first iteration and visible to every row, so m_i is finite after it.
        end = tl.minimum(q_start + q_len, q_start + (m_tile + 1) * BLOCK_M)
        bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
        for n0 in range(0, end, BLOCK_N):
            toks = n0 + tl.arange(0, BLOCK_N)
            t_mask = toks < end
            visible = (toks[None, :] <= pos[:, None]) & t_mask[None, :]  # causal
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, cache_ptr, bt_row, toks, t_mask, visible, kvh,
                offs_d, d_mask, qk_scale, stride_cb, stride_ckv, stride_ct, stride_ch,
                BLOCK_SIZE, DOT_PRECISION, DOT_F32,
            )  # fmt: skip
        out = acc / l_i[:, None]
        o_ptrs = out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _check_cache(q: torch.Tensor, kv_cache: torch.Tensor) -> tuple[int, int, int]:
    """Validates q ``[..., H_q, D]`` against the cache; returns ``(H_q, H_kv, group)``."""
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2:
        raise ValueError(
            f"kv_cache must be [num_blocks, 2, block_size, H_kv, D], got {tuple(kv_cache.shape)}"
        )
    num_heads_q, head_dim = q.shape[-2], q.shape[-1]
    num_heads_kv = kv_cache.shape[3]
    if kv_cache.shape[4] != head_dim or num_heads_q % num_heads_kv != 0:
        raise ValueError(
            f"q heads/dim {num_heads_q}/{head_dim} do not fit kv heads/dim "
            f"{num_heads_kv}/{kv_cache.shape[4]}: need equal head_dim and H_q % H_kv == 0"
        )
    if kv_cache.dtype != q.dtype or kv_cache.device != q.device:
        raise ValueError(
            f"q is {q.dtype} on {q.device} but kv_cache is {kv_cache.dtype} on {kv_cache.device}"
        )
    if kv_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("the last dim (head_dim) of q and kv_cache must be contiguous")
    return num_heads_q, num_heads_kv, num_heads_q // num_heads_kv


def _dot_precision(dtype: torch.dtype) -> str | None:
    # float32 inputs: exact fp32 products (tf32 would miss a 1e-4 tolerance)
    return "ieee" if dtype == torch.float32 or _dot_f32(dtype) else None


def _dot_f32(dtype: torch.dtype) -> bool:
    # Triton's interpreter computes tl.dot on bfloat16 operands wrongly (checked with 3.9):
    # there, and only there, upcast K/V/q to float32 before the dots. Compiled kernels keep
    # bf16 tensor-core dots.
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def paged_decode_attention(
    q: torch.Tensor,  # [B, H_q, D]
    kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, H_kv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32, tokens including the new one
    scale: float | None = None,
    *,
    partition_size: int = 512,
    max_context_len: int | None = None,
    block_n: int = 64,
) -> torch.Tensor:  # [B, H_q, D] in q's dtype
    """Split-K (flash-decoding) paged attention for one new token per sequence.

    ``partition_size`` tokens per program (a multiple of ``block_n``); the number of partitions
    comes from ``max_context_len`` when given, else from ``max_blocks * block_size`` (no host
    sync either way). A sequence with ``context_lens[b] == 0`` gets zeros.
    """
    num_heads_q, _, group = _check_cache(q, kv_cache)
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H_q, D], got {tuple(q.shape)}")
    num_seqs, _, head_dim = q.shape
    if (
        block_tables.dim() != 2
        or block_tables.shape[0] != num_seqs
        or context_lens.shape != (num_seqs,)
    ):
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} / context_lens "
            f"{tuple(context_lens.shape)} must be [B, max_blocks] / [B] with B={num_seqs}"
        )
    if partition_size <= 0 or partition_size % block_n != 0:
        raise ValueError(f"partition_size {partition_size} must be a multiple of {block_n}")
    block_size = kv_cache.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    max_len = block_tables.shape[1] * block_size if max_context_len is None else max_context_len
    num_parts = max(1, triton.cdiv(max_len, partition_size))
    block_tables = block_tables.to(device=q.device, dtype=torch.int32).contiguous()
    context_lens = context_lens.to(device=q.device, dtype=torch.int32).contiguous()
    part_shape = (num_seqs, num_heads_q, num_parts)
    m = torch.empty(part_shape, dtype=torch.float32, device=q.device)
    l_sum = torch.empty(part_shape, dtype=torch.float32, device=q.device)
    acc = torch.empty((*part_shape, head_dim), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_partial_kernel[(num_seqs, kv_cache.shape[3], num_parts)](
        q, kv_cache, block_tables, context_lens, m, l_sum, acc, scale * _LOG2E,
        *q.stride()[:2], *kv_cache.stride()[:4], block_tables.stride(0), num_heads_q, num_parts,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_D=block_d, BLOCK_SIZE=block_size, BLOCK_N=block_n, PARTITION=partition_size,
        DOT_PRECISION=_dot_precision(q.dtype), DOT_F32=_dot_f32(q.dtype),
    )  # fmt: skip
    _decode_reduce_kernel[(num_seqs, num_heads_q)](
        m, l_sum, acc, out, context_lens, *out.stride()[:2], num_heads_q, num_parts,
        HEAD_DIM=head_dim, BLOCK_D=block_d, PARTITION=partition_size,
        BLOCK_P=min(32, triton.next_power_of_2(num_parts)),
    )  # fmt: skip
    return out


def paged_prefill_attention_varlen(
    q: torch.Tensor,  # [total_T, H_q, D]
    kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, H_kv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    cu_q_lens: torch.Tensor,  # [B + 1] int32, cumulative query counts starting at 0
    q_starts: torch.Tensor,  # [B] int32, position of each sequence's first query
    scale: float | None = None,
    *,
    max_q_len: int | None = None,
    block_m: int = 64,
    block_n: int = 64,
) -> torch.Tensor:  # [total_T, H_q, D] in q's dtype
    """Causal attention of several sequences' prefill chunks over their paged caches.

    Sequence ``b`` owns query rows ``cu_q_lens[b] .. cu_q_lens[b+1]-1`` at positions
    ``q_starts[b] + t``; its cache holds K/V of positions ``0 .. q_starts[b] + T_b - 1``.
    ``max_q_len`` sizes the grid; without it ``cu_q_lens`` is read on the host (one sync).
    """
    _, _, group = _check_cache(q, kv_cache)
    if q.dim() != 3:
        raise ValueError(f"q must be [total_T, H_q, D], got {tuple(q.shape)}")
    num_seqs = block_tables.shape[0]
    if cu_q_lens.shape != (num_seqs + 1,) or q_starts.shape != (num_seqs,):
        raise ValueError(
            f"cu_q_lens {tuple(cu_q_lens.shape)} / q_starts {tuple(q_starts.shape)} must be "
            f"[B+1] / [B] with B={num_seqs} (rows of block_tables)"
        )
    head_dim = q.shape[2]
    if max_q_len is None:
        max_q_len = int((cu_q_lens[1:] - cu_q_lens[:-1]).max()) if num_seqs else 0
    out = torch.empty_like(q)
    if max_q_len == 0 or q.shape[0] == 0:
        return out
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    block_tables = block_tables.to(device=q.device, dtype=torch.int32).contiguous()
    cu_q_lens = cu_q_lens.to(device=q.device, dtype=torch.int32).contiguous()
    q_starts = q_starts.to(device=q.device, dtype=torch.int32).contiguous()
    grid = (triton.cdiv(max_q_len, block_m), q.shape[1], num_seqs)
    _prefill_kernel[grid](
        q, kv_cache, block_tables, cu_q_lens, q_starts, out, scale * _LOG2E,
        *q.stride()[:2], *out.stride()[:2], *kv_cache.stride()[:4], block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=kv_cache.shape[2], BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(q.dtype), DOT_F32=_dot_f32(q.dtype),
    )  # fmt: skip
    return out


def paged_prefill_attention(
    q: torch.Tensor,  # [T, H_q, D]
    kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, H_kv, D]
    block_table: torch.Tensor,  # [max_blocks] int32
    q_start: int,  # position of q[0]
    scale: float | None = None,
    **kernel_opts: int,
) -> torch.Tensor:  # [T, H_q, D]
    """One sequence's prefill chunk: ``paged_prefill_attention_varlen`` with B = 1."""
    if q_start < 0:
        raise ValueError(f"q_start must be >= 0, got {q_start}")
    num_tokens = q.shape[0]
    cu = torch.tensor([0, num_tokens], dtype=torch.int32, device=q.device)
    starts = torch.tensor([q_start], dtype=torch.int32, device=q.device)
    return paged_prefill_attention_varlen(
        q,
        kv_cache,
        block_table.reshape(1, -1),
        cu,
        starts,
        scale,
        max_q_len=num_tokens,
        **kernel_opts,
    )


# ---------------------------------------------------------------- torch references


def _gather_kv(
    kv_cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V of a sequence's first ``num_tokens`` positions: ``[num_tokens, H_kv, D]`` each."""
    block_size = kv_cache.shape[2]
    num_pages = -(-num_tokens // block_size)
    pages = block_table[:num_pages].to(device=kv_cache.device, dtype=torch.long)
    kv = kv_cache.index_select(0, pages)  # [pages, 2, bs, H_kv, D]
    k = kv[:, 0].reshape(-1, *kv.shape[3:])[:num_tokens]
    v = kv[:, 1].reshape(-1, *kv.shape[3:])[:num_tokens]
    return k, v


def _attend_ref(
    q: torch.Tensor,  # [T, H_q, D]
    k: torch.Tensor,  # [S, H_kv, D]
    v: torch.Tensor,  # [S, H_kv, D]
    visible: torch.Tensor,  # [T, S] bool
    scale: float,
) -> torch.Tensor:  # [T, H_q, D] float32
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    s = torch.einsum("thd,shd->hts", q.float(), k) * scale
    s = s.masked_fill(~visible, float("-inf"))
    return torch.einsum("hts,shd->thd", torch.softmax(s, dim=-1), v)


def paged_decode_attention_ref(
    q: torch.Tensor,  # [B, H_q, D]
    kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, H_kv, D]
    block_tables: torch.Tensor,  # [B, max_blocks]
    context_lens: torch.Tensor,  # [B]
    scale: float | None = None,
) -> torch.Tensor:  # [B, H_q, D]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.zeros_like(q)
    for b, num_tokens in enumerate(context_lens.tolist()):
        if num_tokens == 0:
            continue
        k, v = _gather_kv(kv_cache, block_tables[b], num_tokens)
        visible = torch.ones((1, num_tokens), dtype=torch.bool, device=q.device)
        out[b] = _attend_ref(q[b : b + 1], k, v, visible, scale)[0].to(q.dtype)
    return out


def paged_prefill_attention_ref(
    q: torch.Tensor,  # [T, H_q, D]
    kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, H_kv, D]
    block_table: torch.Tensor,  # [max_blocks]
    q_start: int,
    scale: float | None = None,
) -> torch.Tensor:  # [T, H_q, D]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    num_tokens = q.shape[0]
    k, v = _gather_kv(kv_cache, block_table, q_start + num_tokens)
    pos = torch.arange(q_start, q_start + num_tokens, device=q.device)
    visible = torch.arange(q_start + num_tokens, device=q.device)[None, :] <= pos[:, None]
    return _attend_ref(q, k, v, visible, scale).to(q.dtype)
