"""Paged attention in Triton: one split-KV (flash-decoding) kernel for any query count.

KV cache of one layer: ``[num_blocks, 2, block_size, H_kv, D]`` (index 0 = K, 1 = V). Block
tables map a sequence's logical block ``j`` (tokens ``j*bs .. j*bs+bs-1``) to a pool block id;
entries past the sequence's last block are padding (any value, never read). GQA: query head
``h`` reads kv head ``h // (H_q // H_kv)``. Scores and softmax in float32; outputs in q's dtype.

``paged_attention_split_kv``: sequence ``b`` has ``q_lens[b]`` queries in rows ``q_rows[b] ..``
of the flat batch, at positions ``q_starts[b] ..``; its cache holds K/V of positions ``0 ..
q_starts[b] + q_lens[b] - 1`` (the chunk's own K/V written already); causal. One program takes
one (sequence, tile of ``block_q`` queries, kv head, partition of the context):

- GQA-packed tiles: the tile's rows are its queries x the query heads of one kv head, so each
  K/V tile is loaded once for the whole group (not once per query head);
- block-table loads per tile: a K/V tile of ``BLOCK_N`` tokens reads its ``BLOCK_N / bs``
  page ids once and addresses the tokens from them;
- split-KV: the context is cut in partitions of ``partition_size`` tokens, so a few queries
  over a long prefix still spread over many SMs; a second kernel merges the partitions'
  (max, sum, acc) in a fixed order. ``split=False`` runs one partition (a long chunk).

Every number a query gets depends on its own sequence only, and on fixed constants (tile and
partition sizes, the merge's block), never on the batch: the kernel is batch-invariant.
``paged_decode_attention`` / ``paged_prefill_attention(_varlen)`` are the decode and chunk
forms; ``*_ref`` are plain torch references (gather, repeat for GQA, masked float32 softmax).
Kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests). This module
imports triton; ``engine`` never imports it on the CPU path.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
MERGE_BLOCK = 16  # partitions merged per step: a constant, so the merge order never varies


@triton.jit
def _split_kv_kernel(
    q_ptr,  # [T, H_q, D]
    cache_ptr,  # [num_blocks, 2, bs, H_kv, D]
    block_tables_ptr,  # [B, max_blocks] int32
    q_rows_ptr,  # [B] int32: first row of each sequence in q / out
    q_lens_ptr,  # [B] int32
    q_starts_ptr,  # [B] int32: position of each sequence's first query
    out_ptr,  # [T, H_q, D] (written when not SPLIT)
    m_ptr,  # [T, H_q, P] float32: running max per partition (log2 domain) (SPLIT)
    l_ptr,  # [T, H_q, P] float32: sum of exp2(s - m) per partition (SPLIT)
    acc_ptr,  # [T, H_q, P, D] float32: un-normalised sum of p * V per partition (SPLIT)
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
    num_heads_q,
    num_parts,
    num_q_tiles,
    GROUP: tl.constexpr,  # H_q // H_kv
    BLOCK_Q: tl.constexpr,  # queries per program
    BLOCK_M: tl.constexpr,  # BLOCK_Q * GROUP rounded up to a power of two >= 16
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per KV block
    BLOCK_N: tl.constexpr,  # tokens per inner iteration (a multiple of BLOCK_SIZE)
    PARTITION: tl.constexpr,  # tokens per partition (a multiple of BLOCK_N)
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,  # upcast dot operands to float32 (interpreter bf16 only)
):
    pid = tl.program_id(0)
    b = pid // num_q_tiles
    q_tile = pid % num_q_tiles
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    q_len = tl.load(q_lens_ptr + b)
    q_first = q_tile * BLOCK_Q
    if q_first < q_len:
        q_start = tl.load(q_starts_ptr + b)
        row0 = tl.load(q_rows_ptr + b).to(tl.int64)
        tile_end = q_start + tl.minimum(q_len, q_first + BLOCK_Q)  # keys the tile can see
        if SPLIT:
            start = part * PARTITION
            end = tl.minimum(start + PARTITION, tile_end)
        else:
            start = 0
            end = tile_end
        r = tl.arange(0, BLOCK_M)
        qi = q_first + r // GROUP  # query of each row
        heads = kvh * GROUP + r % GROUP
        r_mask = (r < BLOCK_Q * GROUP) & (qi < q_len)
        pos = q_start + qi  # [BM] positions of the rows' queries
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        rows = row0 + qi
        q_ptrs = q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=r_mask[:, None] & d_mask[None, :], other=0.0)  # [BM, BD]
        if DOT_F32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
        pages_per_tile: tl.constexpr = BLOCK_N // BLOCK_SIZE
        in_page = tl.arange(0, BLOCK_SIZE)
        for n0 in range(start, end, BLOCK_N):
            page_idx = n0 // BLOCK_SIZE + tl.arange(0, pages_per_tile)
            pages = tl.load(bt_row + page_idx, mask=page_idx * BLOCK_SIZE < end, other=0)
            tok_off = pages.to(tl.int64)[:, None] * stride_cb + in_page[None, :] * stride_ct
            kv_off = tl.reshape(tok_off, [BLOCK_N]) + kvh * stride_ch  # [BN]
            toks = n0 + tl.arange(0, BLOCK_N)
            t_mask = toks < end
            kv_ptrs = cache_ptr + kv_off[:, None] + offs_d[None, :]
            kv_mask = t_mask[:, None] & d_mask[None, :]
            k = tl.load(kv_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(kv_ptrs + stride_ckv, mask=kv_mask, other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BM, BN]
            visible = (toks[None, :] <= pos[:, None]) & t_mask[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(
                p.to(v.dtype), v, input_precision=DOT_PRECISION
            )  # fmt: skip
            m_i = m_new
        if SPLIT:
            idx = (rows * num_heads_q + heads) * num_parts + part  # [BM]
            tl.store(m_ptr + idx, m_i, mask=r_mask)
            tl.store(l_ptr + idx, l_i, mask=r_mask)
            a_ptrs = acc_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :]
            tl.store(a_ptrs, acc, mask=r_mask[:, None] & d_mask[None, :])
        else:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            o_ptrs = out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh
            tl.store(o_ptrs + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=r_mask[:, None] & d_mask[None, :])  # fmt: skip


@triton.jit
def _merge_kernel(
    m_ptr,
    l_ptr,
    acc_ptr,  # partials, see _split_kv_kernel
    out_ptr,  # [T, H_q, D]
    q_rows_ptr,
    q_lens_ptr,
    q_starts_ptr,
    stride_ot,
    stride_oh,
    num_heads_q,
    num_parts,
    max_q_len,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PARTITION: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // max_q_len
    qi = pid % max_q_len
    h = tl.program_id(1)
    if qi < tl.load(q_lens_ptr + b):
        row = tl.load(q_rows_ptr + b).to(tl.int64) + qi
        pos = tl.load(q_starts_ptr + b) + qi
        parts = tl.cdiv(pos + 1, PARTITION)  # the partitions holding keys this query sees
        base = (row * num_heads_q + h) * num_parts
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        m_tot = tl.full([], float("-inf"), tl.float32)
        l_tot = tl.zeros([], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for p0 in range(0, parts, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_mask = offs_p < parts
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
        out = acc / tl.where(l_tot > 0, l_tot, 1.0)
        o_ptrs = out_ptr + row * stride_ot + h * stride_oh + offs_d
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=d_mask)


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


def paged_attention_split_kv(
    q: torch.Tensor,  # [T, H_q, D]
    kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, H_kv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    q_rows: torch.Tensor,  # [B] int32
    q_lens: torch.Tensor,  # [B] int32
    q_starts: torch.Tensor,  # [B] int32
    scale: float | None = None,
    *,
    max_q_len: int,
    max_context_len: int,
    out: torch.Tensor | None = None,  # [T, H_q, D]: written in the sequences' rows only
    split: bool = True,
    block_q: int | None = None,
    partition_size: int = 512,
    block_n: int = 64,
) -> torch.Tensor:
    """Causal attention of ``B`` sequences' queries over their paged caches (see the module).

    ``max_q_len`` / ``max_context_len`` size the grid (no host sync); a sequence whose
    ``q_lens`` is 0 is skipped. ``block_q``: queries per program (default 1 for a decode
    launch, 16 otherwise); ``partition_size`` a multiple of ``block_n``, itself a multiple of
    the block size.
    """
    num_heads_q, num_heads_kv, group = _check_cache(q, kv_cache)
    if q.dim() != 3:
        raise ValueError(f"q must be [T, H_q, D], got {tuple(q.shape)}")
    num_seqs = block_tables.shape[0]
    if block_tables.dim() != 2 or any(t.shape != (num_seqs,) for t in (q_rows, q_lens, q_starts)):
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} must be [B, max_blocks] and q_rows / "
            f"q_lens / q_starts [B] ({tuple(q_rows.shape)}, {tuple(q_lens.shape)}, "
            f"{tuple(q_starts.shape)})"
        )
    block_size = kv_cache.shape[2]
    if block_n % block_size or partition_size % block_n:
        raise ValueError(
            f"block_n {block_n} must be a multiple of the block size {block_size} and "
            f"partition_size {partition_size} a multiple of block_n"
        )
    out = torch.zeros_like(q) if out is None else out
    if num_seqs == 0 or max_q_len == 0 or q.shape[0] == 0:
        return out
    head_dim = q.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    block_q = block_q or (1 if max_q_len == 1 else 16)
    block_m = max(16, triton.next_power_of_2(block_q * group))
    num_q_tiles = triton.cdiv(max_q_len, block_q)
    num_parts = max(1, triton.cdiv(max_context_len, partition_size)) if split else 1
    split = split and num_parts > 1
    block_d = max(16, triton.next_power_of_2(head_dim))
    if split:
        part_shape = (q.shape[0], num_heads_q, num_parts)
        m = torch.empty(part_shape, dtype=torch.float32, device=q.device)
        l_sum = torch.empty(part_shape, dtype=torch.float32, device=q.device)
        acc = torch.empty((*part_shape, head_dim), dtype=torch.float32, device=q.device)
    else:
        m = l_sum = acc = out  # not read
    _split_kv_kernel[(num_seqs * num_q_tiles, num_heads_kv, num_parts)](
        q, kv_cache, block_tables, q_rows, q_lens, q_starts, out, m, l_sum, acc,
        scale * _LOG2E, *q.stride()[:2], *out.stride()[:2], *kv_cache.stride()[:4],
        block_tables.stride(0), num_heads_q, num_parts, num_q_tiles,
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, PARTITION=partition_size, SPLIT=split,
        DOT_PRECISION=_dot_precision(q.dtype), DOT_F32=_dot_f32(q.dtype),
    )  # fmt: skip
    if split:
        _merge_kernel[(num_seqs * max_q_len, num_heads_q)](
            m, l_sum, acc, out, q_rows, q_lens, q_starts, *out.stride()[:2], num_heads_q,
            num_parts, max_q_len, HEAD_DIM=head_dim, BLOCK_D=block_d,
            PARTITION=partition_size, BLOCK_P=MERGE_BLOCK,
        )  # fmt: skip
    return out


def _int32(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.int32).contiguous()


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
    """One new query per sequence (its K/V already in the cache); ``context_lens[b] == 0``
    gives zeros. ``max_context_len`` sizes the split (default: the block tables' width)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H_q, D], got {tuple(q.shape)}")
    num_seqs = q.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or context_lens.shape != (
        num_seqs,
    ):
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} / context_lens "
            f"{tuple(context_lens.shape)} must be [B, max_blocks] / [B] with B={num_seqs}"
        )
    dev = q.device
    ctx = _int32(context_lens, dev)
    max_len = block_tables.shape[1] * kv_cache.shape[2]
    return paged_attention_split_kv(
        q, kv_cache, _int32(block_tables, dev), torch.arange(num_seqs, dtype=torch.int32,
        device=dev), (ctx > 0).to(torch.int32), (ctx - 1).clamp(min=0), scale, max_q_len=1,
        max_context_len=max_context_len or max_len, partition_size=partition_size,
        block_n=block_n,
    )  # fmt: skip


def paged_prefill_attention_varlen(
    q: torch.Tensor,  # [total_T, H_q, D]
    kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, H_kv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    cu_q_lens: torch.Tensor,  # [B + 1] int32, cumulative query counts starting at 0
    q_starts: torch.Tensor,  # [B] int32, position of each sequence's first query
    scale: float | None = None,
    *,
    max_q_len: int | None = None,
    split: bool = False,
    **kernel_opts: Any,  # block_q, partition_size, block_n
) -> torch.Tensor:  # [total_T, H_q, D] in q's dtype
    """Causal attention of several sequences' chunks; sequence ``b`` owns query rows
    ``cu_q_lens[b] .. cu_q_lens[b+1]-1`` at positions ``q_starts[b] + t``. ``max_q_len`` sizes
    the grid; without it ``cu_q_lens`` is read on the host (one sync)."""
    _check_cache(q, kv_cache)
    num_seqs = block_tables.shape[0]
    if cu_q_lens.shape != (num_seqs + 1,) or q_starts.shape != (num_seqs,):
        raise ValueError(
            f"cu_q_lens {tuple(cu_q_lens.shape)} / q_starts {tuple(q_starts.shape)} must be "
            f"[B+1] / [B] with B={num_seqs} (rows of block_tables)"
        )
    dev = q.device
    cu = _int32(cu_q_lens, dev)
    q_lens = cu[1:] - cu[:-1]
    if max_q_len is None:
        max_q_len = int(q_lens.max()) if num_seqs else 0
    max_ctx = block_tables.shape[1] * kv_cache.shape[2]
    return paged_attention_split_kv(
        q, kv_cache, _int32(block_tables, dev), cu[:-1].contiguous(), q_lens.contiguous(),
        _int32(q_starts, dev), scale, max_q_len=max_q_len, max_context_len=max_ctx, split=split,
        **kernel_opts,
    )  # fmt: skip


def paged_prefill_attention(
    q: torch.Tensor,  # [T, H_q, D]
    kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, H_kv, D]
    block_table: torch.Tensor,  # [max_blocks] int32
    q_start: int,  # position of q[0]
    scale: float | None = None,
    **kernel_opts: Any,  # split, block_q, partition_size, block_n
) -> torch.Tensor:  # [T, H_q, D]
    """One sequence's prefill chunk: ``paged_prefill_attention_varlen`` with B = 1."""
    if q_start < 0:
        raise ValueError(f"q_start must be >= 0, got {q_start}")
    num_tokens = q.shape[0]
    cu = torch.tensor([0, num_tokens], dtype=torch.int32, device=q.device)
    starts = torch.tensor([q_start], dtype=torch.int32, device=q.device)
    return paged_prefill_attention_varlen(
        q, kv_cache, block_table.reshape(1, -1), cu, starts, scale, max_q_len=num_tokens,
        **kernel_opts,
    )  # fmt: skip


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
