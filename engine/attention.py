"""Attention over the paged KV pool: metadata, KV writes and the torch reference.

The pool holds, per layer, ``[num_blocks, 2, block_size, H_kv, D]`` (0 = K, 1 = V). A step runs
a flat batch of tokens from several sequences: prefill chunks (``q_len`` tokens starting at
``q_start``, attending to the cached prefix and causally to themselves) and decodes
(``q_len == 1``). The reference loops over sequences and is the path every CPU run uses; the
Triton kernels in ``engine.attention_triton`` implement the same contract on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SeqSlice:
    q_start: int  # position of the first query token (= tokens already in the cache before)
    q_len: int  # query tokens of this sequence in the flat batch
    block_ids: torch.Tensor  # [num_blocks_of_seq] int64, on the pool's device

    @property
    def ctx_len(self) -> int:
        return self.q_start + self.q_len


@dataclass(frozen=True)
class KernelArgs:
    """Batched tensors for the Triton kernels (built only when they are used)."""

    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    context_lens: torch.Tensor  # [B] int32: tokens in the cache after this step
    cu_q_lens: torch.Tensor  # [B + 1] int32: cumulative query counts
    q_starts: torch.Tensor  # [B] int32: position of each sequence's first query
    max_q_len: int
    max_context_len: int
    all_decode: bool  # every sequence has exactly one query (a pure decode step)
    no_prefix: bool  # no sequence has cached tokens before its chunk (a cold prefill)


@dataclass(frozen=True)
class AttnMetadata:
    slot_block: torch.Tensor  # [T] int64: pool block receiving each token's K/V
    slot_offset: torch.Tensor  # [T] int64: offset inside that block
    seqs: tuple[SeqSlice, ...]  # in the order of the flat batch
    block_size: int
    sliding_window: int | None = None
    kernel: KernelArgs | None = None  # set: use the Triton kernels (engine.attention_triton)


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata) -> None:
    # cache: [NB, 2, bs, H_kv, D]; k, v: [T, H_kv, D]
    cache[meta.slot_block, 0, meta.slot_offset] = k
    cache[meta.slot_block, 1, meta.slot_offset] = v


def _causal_mask(
    q_start: int, q_len: int, ctx_len: int, window: int | None, device
) -> torch.Tensor:
    # [q_len, ctx_len] bool, True = attend
    qpos = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    kpos = torch.arange(ctx_len, device=device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return mask


def paged_attention_ref(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache: torch.Tensor,
    meta: AttnMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [T, H_q, D]; k_new, v_new: [T, H_kv, D] (already written to ``cache``) -> [T, H_q, D]."""
    out = torch.empty_like(q)
    bs = meta.block_size
    t0 = 0
    for s in meta.seqs:
        qs = q[t0 : t0 + s.q_len].transpose(0, 1)  # [H_q, q_len, D]
        if s.q_start == 0:
            # Nothing cached before this chunk: its own K/V are the whole context.
            ks = k_new[t0 : t0 + s.q_len].transpose(0, 1)
            vs = v_new[t0 : t0 + s.q_len].transpose(0, 1)
        else:
            nb = (s.ctx_len + bs - 1) // bs
            blocks = cache.index_select(0, s.block_ids[:nb])  # [nb, 2, bs, H_kv, D]
            ks = blocks[:, 0].reshape(nb * bs, *blocks.shape[3:])[: s.ctx_len].transpose(0, 1)
            vs = blocks[:, 1].reshape(nb * bs, *blocks.shape[3:])[: s.ctx_len].transpose(0, 1)
        # 4-D inputs [1, H, S, D]: PyTorch's fused CPU kernel takes them; 3-D ones fall back
        # to the unfused path that materialises every score (about 10x slower at 2K tokens).
        qs, ks, vs = qs[None], ks[None], vs[None]
        if s.q_start == 0 and meta.sliding_window is None:
            o = F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True
            )
        elif s.q_len == 1 and (meta.sliding_window is None or s.ctx_len <= meta.sliding_window):
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=True)
        else:
            mask = _causal_mask(s.q_start, s.q_len, s.ctx_len, meta.sliding_window, q.device)
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask[None, None], scale=scale, enable_gqa=True
            )
        o = o[0]
        out[t0 : t0 + s.q_len] = o.transpose(0, 1)
        t0 += s.q_len
    return out


def paged_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache: torch.Tensor,
    meta: AttnMetadata,
    scale: float,
) -> torch.Tensor:
    """Dispatch: the Triton kernels when ``meta.kernel`` is set, the torch reference otherwise.

    A cold prefill on CUDA (no cached prefix) goes to PyTorch's fused attention, the fastest
    path when there is nothing paged to read.
    """
    k = meta.kernel
    if k is None or (k.no_prefix and q.is_cuda):
        return paged_attention_ref(q, k_new, v_new, cache, meta, scale)
    from engine.attention_triton import paged_decode_attention, paged_prefill_attention_varlen

    if k.all_decode:
        return paged_decode_attention(
            q, cache, k.block_tables, k.context_lens, scale, max_context_len=k.max_context_len
        )
    return paged_prefill_attention_varlen(
        q, cache, k.block_tables, k.cu_q_lens, k.q_starts, scale, max_q_len=k.max_q_len
    )
