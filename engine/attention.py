"""Attention over the paged KV pool: per-step metadata, and which kernel attends which sequence.

The pool holds, per layer, ``[num_blocks, 2, block_size, H_kv, D]`` (0 = K, 1 = V). A step runs
a flat batch of tokens from several sequences: each one ``q_len`` tokens starting at position
``q_start``, attending to the cached prefix and causally to themselves (a decode is
``q_len == 1``). Each sequence goes to one of two paths, chosen from its own shape only (the
runner's ``route``), so a sequence's numbers never depend on its batch mates:

- ``seqs``: PyTorch's ``scaled_dot_product_attention``, one call per sequence. A chunk with
  nothing cached before it attends over its own K/V as computed (no paging at all); a chunk
  over a cached prefix attends over the prefix's K/V gathered contiguously from the pool, with
  a lower-right causal mask. On CUDA that mask dispatches to the flash kernel PyTorch ships
  (the kernel Hugging Face's SDPA attention runs, so a cold prefill is at parity with it by
  construction); on a CPU to PyTorch's fused CPU kernel. Every CPU run uses this path.
- ``launches``: ``engine.attention_triton``'s split-KV kernel over the paged pool (CUDA with
  Triton): decodes and short chunks (``q_len <= SHORT_MAX_QUERIES``, a warm hit's last
  chunk). A few queries over a long prefix are where the flash kernel wastes its 128-row tiles
  and cannot split the context over SMs, and where gathering the prefix would cost more than
  the attention itself; the split-KV kernel reads the pages in place, packs the GQA group
  into one tile and spreads the context over partitions. ``attention_backend=triton`` sends
  long chunks over a prefix there too (one partition per tile row), for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SHORT_MAX_QUERIES = 16  # a chunk this short over a prefix goes to the split-KV kernel


@dataclass(frozen=True)
class SeqSlice:
    row: int  # first row of this sequence in the flat batch
    q_start: int  # position of the first query token (= tokens already in the cache before)
    q_len: int  # query tokens of this sequence in the flat batch
    block_ids: torch.Tensor  # [num_blocks_of_seq] int64, on the pool's device

    @property
    def ctx_len(self) -> int:
        return self.q_start + self.q_len


@dataclass(frozen=True)
class SplitKVLaunch:
    """One launch of ``engine.attention_triton.paged_attention_split_kv``."""

    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with the scratch block
    q_rows: torch.Tensor  # [B] int32: first row of each sequence in the flat batch
    q_lens: torch.Tensor  # [B] int32
    q_starts: torch.Tensor  # [B] int32: position of each sequence's first query
    max_q_len: int  # 1: a decode launch (one query per tile); else tiles of 16 queries
    max_context_len: int  # sizes the split over the context (a graph's context bucket)
    split: bool = True  # False: one partition per tile (long chunks, backend "triton")


@dataclass(frozen=True)
class AttnMetadata:
    slot_block: torch.Tensor  # [T] int64: pool block receiving each token's K/V
    slot_offset: torch.Tensor  # [T] int64: offset inside that block
    seqs: tuple[SeqSlice, ...]  # attended with SDPA, one call each
    block_size: int
    sliding_window: int | None = None
    launches: tuple[SplitKVLaunch, ...] = ()  # the other sequences: Triton split-KV
    fused: bool = False  # norms, RoPE + KV write and SiLU in Triton kernels (engine.ops)
    batch_invariant: bool = False  # projections through engine.matmul (deterministic mode)


def _causal_mask(
    q_start: int, q_len: int, ctx_len: int, window: int | None, device: torch.device
) -> torch.Tensor:
    # [q_len, ctx_len] bool, True = attend
    qpos = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    kpos = torch.arange(ctx_len, device=device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return mask


def gather_prefix(
    cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of a sequence's first ``num_tokens`` positions, ``[num_tokens, H_kv, D]`` each,
    contiguous: one indexed copy per tensor, no per-token work."""
    nb = -(-num_tokens // cache.shape[2])
    ids = block_ids[:nb]
    k = cache[:, 0].index_select(0, ids).flatten(0, 1)[:num_tokens]
    v = cache[:, 1].index_select(0, ids).flatten(0, 1)[:num_tokens]
    return k, v


def attend_sdpa(
    q: torch.Tensor,  # [q_len, H_q, D]
    k: torch.Tensor,  # [ctx_len, H_kv, D]
    v: torch.Tensor,  # [ctx_len, H_kv, D]
    q_start: int,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:  # [q_len, H_q, D]
    """Causal attention of queries at ``q_start ..`` over keys ``0 .. ctx_len - 1``."""
    q_len, ctx = q.shape[0], k.shape[0]
    # [1, H, S, D] views: the fused kernels take them (3-D inputs fall back to a path that
    # materialises every score, ~10x slower on a CPU at 2K tokens)
    qs, ks, vs = (t.transpose(0, 1)[None] for t in (q, k, v))
    windowed = window is not None and ctx > window
    if q_len == 1 and not windowed:
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=True)
    elif q_len == ctx and not windowed:
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
    elif q.is_cuda and not windowed:
        # imported here: it imports triton, which the CPU path never needs (and which the
        # interpreter tests must import first, with TRITON_INTERPRET set)
        from torch.nn.attention.bias import causal_lower_right

        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=causal_lower_right(q_len, ctx), scale=scale, enable_gqa=True
        )
    else:  # CPU: the same lower-right mask, materialised (what PyTorch does there anyway)
        mask = _causal_mask(q_start, q_len, ctx, window, q.device)
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask[None, None], scale=scale, enable_gqa=True
        )
    return o[0].transpose(0, 1)


def paged_attention(
    q: torch.Tensor,  # [T, H_q, D]
    k_new: torch.Tensor,  # [T, H_kv, D] (already written to ``cache``)
    v_new: torch.Tensor,  # [T, H_kv, D]
    cache: torch.Tensor,  # [num_blocks, 2, bs, H_kv, D]
    meta: AttnMetadata,
    scale: float,
) -> torch.Tensor:  # [T, H_q, D]
    out = torch.zeros_like(q) if meta.launches else torch.empty_like(q)
    for s in meta.seqs:
        rows = slice(s.row, s.row + s.q_len)
        if s.q_start == 0:  # nothing cached before this chunk: its own K/V are the context
            k, v = k_new[rows], v_new[rows]
        else:
            k, v = gather_prefix(cache, s.block_ids, s.ctx_len)
        out[rows] = attend_sdpa(q[rows], k, v, s.q_start, scale, meta.sliding_window)
    if meta.launches:
        from engine.attention_triton import paged_attention_split_kv

        for la in meta.launches:
            paged_attention_split_kv(
                q, cache, la.block_tables, la.q_rows, la.q_lens, la.q_starts, scale,
                max_q_len=la.max_q_len, max_context_len=la.max_context_len, out=out,
                split=la.split,
            )  # fmt: skip
    return out
