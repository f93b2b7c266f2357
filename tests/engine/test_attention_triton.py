"""The split-KV paged attention kernel vs torch references, under TRITON_INTERPRET=1 on CPU:
decodes, chunks (split over the context or not, GQA-packed tiles of several queries), launches
over a subset of a flat batch's rows, and one sequence's bits alone or among others."""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest
import torch

from engine.attention_triton import (
    paged_attention_split_kv,
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_prefill_attention,
    paged_prefill_attention_ref,
    paged_prefill_attention_varlen,
)

H_Q, H_KV, HEAD_DIM, BLOCK_SIZE = 4, 2, 16, 4
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _device() -> torch.device:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET is off and there is no CUDA device")
    return torch.device("cuda")


def _paged(
    lens: list[int], dtype: torch.dtype, gen: torch.Generator, pad: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """A shuffled pool holding ``len`` tokens per sequence; returns (kv_cache, block_tables)."""
    pages = [-(-n // BLOCK_SIZE) for n in lens]
    num_blocks = sum(pages) + 3  # a few blocks nobody owns
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(lens), max(pages) + 2), pad, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        tables[b, :n] = perm[used : used + n]
        used += n
    # kv_cache: [num_blocks, 2, bs, H_kv, D]
    cache = torch.randn((num_blocks, 2, BLOCK_SIZE, H_KV, HEAD_DIM), generator=gen)
    return cache.to(dtype), tables


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == want.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_matches_reference_ragged_split_k(dtype: torch.dtype) -> None:
    device = _device()
    gen = torch.Generator().manual_seed(0)
    lens = [1, 5, 17, 33]
    cache, tables = _paged(lens, dtype, gen)
    q = torch.randn((len(lens), H_Q, HEAD_DIM), generator=gen).to(dtype)
    cache, tables, q = cache.to(device), tables.to(device), q.to(device)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    # partition of 8 tokens with 8-token iterations: 33 tokens span 5 partitions
    got = paged_decode_attention(q, cache, tables, ctx, partition_size=8, block_n=8)
    want = paged_decode_attention_ref(q, cache, tables, ctx)
    _assert_close(got, want, dtype)
    # the same with one partition per sequence (no split) and a wider inner loop
    got_one = paged_decode_attention(q, cache, tables, ctx, partition_size=64, block_n=16)
    _assert_close(got_one, want, dtype)


def test_decode_len_one_returns_that_value_and_custom_scale() -> None:
    device = _device()
    gen = torch.Generator().manual_seed(1)
    cache, tables = _paged([1, 9], torch.float32, gen, pad=0)
    q = torch.randn((2, H_Q, HEAD_DIM), generator=gen)
    ctx = torch.tensor([1, 9], dtype=torch.int32)
    out = paged_decode_attention(
        q.to(device),
        cache.to(device),
        tables.to(device),
        ctx.to(device),
        0.3,
        partition_size=16,
        block_n=16,
    ).cpu()
    # one visible token: the output is its V, for each query head of the group
    v0 = cache[tables[0, 0], 1, 0]  # [H_kv, D]
    torch.testing.assert_close(out[0], v0.repeat_interleave(H_Q // H_KV, 0))
    want = paged_decode_attention_ref(q, cache, tables, ctx, 0.3)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(want, paged_decode_attention_ref(q, cache, tables, ctx))


def test_decode_zero_length_gives_zeros_and_max_context_len() -> None:
    device = _device()
    gen = torch.Generator().manual_seed(2)
    cache, tables = _paged([6, 1], torch.float32, gen)
    q = torch.randn((2, H_Q, HEAD_DIM), generator=gen)
    ctx = torch.tensor([6, 0], dtype=torch.int32)
    out = paged_decode_attention(
        q.to(device),
        cache.to(device),
        tables.to(device),
        ctx.to(device),
        partition_size=8,
        block_n=8,
        max_context_len=6,
    ).cpu()
    assert torch.all(out[1] == 0)
    torch.testing.assert_close(out, paged_decode_attention_ref(q, cache, tables, ctx))


def test_decode_reference_matches_dense_softmax() -> None:
    # guards the reference itself: dense attention over explicitly laid out K/V
    gen = torch.Generator().manual_seed(3)
    cache, tables = _paged([7], torch.float32, gen)
    q = torch.randn((1, H_Q, HEAD_DIM), generator=gen)
    k = cache[tables[0, :2].long(), 0].reshape(-1, H_KV, HEAD_DIM)[:7]
    v = cache[tables[0, :2].long(), 1].reshape(-1, H_KV, HEAD_DIM)[:7]
    for h in range(H_Q):
        kvh = h // (H_Q // H_KV)
        p = torch.softmax(k[:, kvh] @ q[0, h] / math.sqrt(HEAD_DIM), dim=0)
        want = p @ v[:, kvh]
        got = paged_decode_attention_ref(q, cache, tables, torch.tensor([7]))[0, h]
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("q_start", "num_tokens"), [(0, 5), (13, 20), (29, 4)])
def test_prefill_matches_reference(dtype: torch.dtype, q_start: int, num_tokens: int) -> None:
    device = _device()
    gen = torch.Generator().manual_seed(10 + q_start)
    cache, tables = _paged([q_start + num_tokens], dtype, gen)
    q = torch.randn((num_tokens, H_Q, HEAD_DIM), generator=gen).to(dtype)
    want = paged_prefill_attention_ref(q, cache, tables[0], q_start)
    for split, block_q in ((False, 4), (True, 16)):  # several query tiles / one, split or not
        got = paged_prefill_attention(
            q.to(device), cache.to(device), tables[0].to(device), q_start, block_q=block_q,
            block_n=8, split=split, partition_size=16,
        )  # fmt: skip
        _assert_close(got.cpu(), want, dtype)


def test_prefill_last_row_equals_decode() -> None:
    # the chunk's last query attends the whole context: same as a decode step at that position
    device = _device()
    gen = torch.Generator().manual_seed(20)
    cache, tables = _paged([21], torch.float32, gen)
    q = torch.randn((6, H_Q, HEAD_DIM), generator=gen)
    cache, tables, q = cache.to(device), tables.to(device), q.to(device)
    pre = paged_prefill_attention(q, cache, tables[0], 15, block_q=4, block_n=16)
    dec = paged_decode_attention(
        q[-1:],
        cache,
        tables[:1],
        torch.tensor([21], dtype=torch.int32, device=device),
        partition_size=16,
        block_n=16,
    )
    torch.testing.assert_close(pre[-1], dec[0], atol=1e-5, rtol=1e-5)


def test_prefill_varlen_matches_per_sequence_reference() -> None:
    device = _device()
    gen = torch.Generator().manual_seed(30)
    starts, counts = [0, 9, 30], [7, 20, 3]
    cache, tables = _paged([s + n for s, n in zip(starts, counts)], torch.float32, gen)
    q = torch.randn((sum(counts), H_Q, HEAD_DIM), generator=gen)
    cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    got = paged_prefill_attention_varlen(
        q.to(device),
        cache.to(device),
        tables.to(device),
        cu.to(device),
        torch.tensor(starts, dtype=torch.int32, device=device),
        block_q=8,
        block_n=16,
    ).cpu()
    for b, start in enumerate(starts):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        assert rows.stop - rows.start == counts[b]
        want = paged_prefill_attention_ref(q[rows], cache, tables[b], start)
        torch.testing.assert_close(got[rows], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launch_over_some_rows_of_a_flat_batch(dtype: torch.dtype) -> None:
    # The runner's short-chunk launch: sequences at scattered rows of a flat batch, each with
    # a few queries after a cached prefix, the context split into partitions; rows of other
    # sequences are left as they were.
    device = _device()
    gen = torch.Generator().manual_seed(60)
    starts, counts, rows = [20, 3, 41], [5, 1, 16], [2, 11, 14]
    cache, tables = _paged([s + n for s, n in zip(starts, counts)], dtype, gen)
    q = torch.randn((32, H_Q, HEAD_DIM), generator=gen).to(dtype)
    out = torch.full_like(q, 7.0)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)
    paged_attention_split_kv(
        q.to(device), cache.to(device), tables.to(device), i32(rows), i32(counts), i32(starts),
        max_q_len=16, max_context_len=57, out=out, partition_size=16, block_n=8,
    )  # fmt: skip
    covered = torch.zeros(32, dtype=torch.bool)
    for b, (row, n, start) in enumerate(zip(rows, counts, starts)):
        want = paged_prefill_attention_ref(q[row : row + n], cache, tables[b], start)
        _assert_close(out[row : row + n].cpu(), want, dtype)
        covered[row : row + n] = True
    assert torch.all(out[~covered] == 7.0)


def test_a_sequence_gets_the_same_bits_alone_and_in_a_batch() -> None:
    device = _device()
    gen = torch.Generator().manual_seed(70)
    lens = [37, 9, 60, 2]
    cache, tables = _paged(lens, torch.bfloat16, gen)
    cache, tables = cache.to(device), tables.to(device)
    q = torch.randn((len(lens), H_Q, HEAD_DIM), generator=gen).to(torch.bfloat16).to(device)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    opts = dict(partition_size=16, block_n=8)
    together = paged_decode_attention(q, cache, tables, ctx, **opts)
    alone = paged_decode_attention(q[2:3], cache, tables[2:3], ctx[2:3], **opts)
    assert torch.equal(together[2], alone[0])


def test_bad_arguments_raise_value_error() -> None:
    device = _device()
    gen = torch.Generator().manual_seed(40)
    cache, tables = _paged([5], torch.float32, gen)
    cache, tables = cache.to(device), tables.to(device)
    ctx = torch.tensor([5], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="H_q % H_kv"):
        paged_decode_attention(torch.zeros((1, 3, HEAD_DIM), device=device), cache, tables, ctx)
    with pytest.raises(ValueError, match="float16"):
        paged_decode_attention(
            torch.zeros((1, H_Q, HEAD_DIM), dtype=torch.float16, device=device), cache, tables, ctx
        )
    with pytest.raises(ValueError, match="multiple of"):
        paged_decode_attention(
            torch.zeros((1, H_Q, HEAD_DIM), device=device), cache, tables, ctx, partition_size=20
        )
    with pytest.raises(ValueError, match="q_start"):
        paged_prefill_attention(
            torch.zeros((2, H_Q, HEAD_DIM), device=device), cache, tables[0], -1
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_and_prefill_on_cuda_real_shapes() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiled-kernel test; run without TRITON_INTERPRET=1")
    gen = torch.Generator().manual_seed(50)
    h_q, h_kv, d, bs = 32, 8, 128, 16
    lens = [1, 100, 1500, 4097]
    pages = [-(-n // bs) for n in lens]
    cache = torch.randn((sum(pages) + 4, 2, bs, h_kv, d), generator=gen).cuda().bfloat16()
    perm = torch.randperm(sum(pages), generator=gen)
    tables = torch.zeros((len(lens), max(pages)), dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        tables[b, :n] = perm[used : used + n]
        used += n
    tables = tables.cuda()
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn((len(lens), h_q, d), generator=gen).cuda().bfloat16()
    got = paged_decode_attention(q, cache, tables, ctx)
    want = paged_decode_attention_ref(q, cache, tables, ctx)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    qp = torch.randn((600, h_q, d), generator=gen).cuda().bfloat16()
    want_p = paged_prefill_attention_ref(qp, cache, tables[3], 4097 - 600)
    for split in (False, True):
        got_p = paged_prefill_attention(qp, cache, tables[3], 4097 - 600, split=split)
        torch.testing.assert_close(got_p.float(), want_p.float(), atol=2e-2, rtol=2e-2)
    qs = qp[:12]  # a short chunk (a warm hit's tail) over 4K of prefix, split over partitions
    got_s = paged_prefill_attention(qs, cache, tables[3], 4097 - 12, split=True)
    want_s = paged_prefill_attention_ref(qs, cache, tables[3], 4097 - 12)
    torch.testing.assert_close(got_s.float(), want_s.float(), atol=2e-2, rtol=2e-2)
