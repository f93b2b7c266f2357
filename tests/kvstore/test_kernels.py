"""Triton gather/scatter vs the torch reference, bitwise, under TRITON_INTERPRET=1 on CPU."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest
import torch

from kvstore.kernels import gather_blocks_triton, scatter_blocks_triton
from kvstore.layout import KVLayout
from kvstore.pool_copy import gather_blocks_torch, scatter_blocks_torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NUM_BLOCKS = 12


def _device() -> torch.device:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET is off and there is no CUDA device")
    return torch.device("cuda")


def _layout(dtype: torch.dtype) -> KVLayout:
    # one layer-block is 2*4*2*24 = 384 elements: not a power of two, exercises the mask
    return KVLayout(num_layers=3, block_size=4, num_kv_heads=2, head_dim=24, dtype=dtype)


def _pool(layout: KVLayout, gen: torch.Generator, device: torch.device) -> list[torch.Tensor]:
    # caches: L x [num_blocks, 2, bs, H, D], each its own allocation
    shape = (NUM_BLOCKS, *layout.pool_block_shape())
    return [
        torch.randn(shape, generator=gen).to(device=device, dtype=layout.dtype)
        for _ in range(layout.num_layers)
    ]


def _ids(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(NUM_BLOCKS, generator=gen)[:n]


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    # compare raw bits (so -0.0 vs 0.0 or differing NaN payloads would be caught)
    as_int = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(as_int), b.view(as_int))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_matches_torch_bitwise(dtype: torch.dtype) -> None:
    device = _device()
    gen = torch.Generator().manual_seed(1)
    layout = _layout(dtype)
    caches = _pool(layout, gen, device)
    ids = _ids(5, gen)
    # out has extra rows: they must stay untouched
    out = torch.full((7, *layout.block_shape), -7.0, dtype=dtype, device=device)
    ref = out.clone()
    gather_blocks_torch(caches, ids, ref, layout)
    assert gather_blocks_triton(caches, ids, out, layout) is out
    assert _bitwise_equal(out, ref)
    assert torch.all(out[5:] == -7.0)
    for i, block_id in enumerate(ids.tolist()):
        for layer in range(layout.num_layers):
            assert torch.equal(out[i, layer], caches[layer][block_id])


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_matches_torch_bitwise(dtype: torch.dtype) -> None:
    device = _device()
    gen = torch.Generator().manual_seed(2)
    layout = _layout(dtype)
    caches = _pool(layout, gen, device)
    ref_caches = [c.clone() for c in caches]
    ids = _ids(6, gen)
    src = torch.randn((6, *layout.block_shape), generator=gen).to(device=device, dtype=dtype)
    scatter_blocks_torch(ref_caches, ids, src, layout)
    scatter_blocks_triton(caches, ids, src, layout)
    for got, want in zip(caches, ref_caches):
        assert _bitwise_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_then_gather_roundtrip(dtype: torch.dtype) -> None:
    device = _device()
    gen = torch.Generator().manual_seed(3)
    layout = _layout(dtype)
    caches = [torch.zeros_like(c) for c in _pool(layout, gen, device)]
    ids = _ids(4, gen)
    src = torch.randn((4, *layout.block_shape), generator=gen).to(device=device, dtype=dtype)
    scatter_blocks_triton(caches, ids, src, layout)
    untouched = sorted(set(range(NUM_BLOCKS)) - set(ids.tolist()))
    for cache in caches:
        assert torch.all(cache[untouched] == 0)
    # gather back in a different order into a strided slice of a bigger staging buffer
    perm = torch.tensor([2, 0, 3, 1])
    staging = torch.zeros((8, *layout.block_shape), dtype=dtype, device=device)
    out = staging[2:6]
    gather_blocks_triton(caches, ids[perm], out, layout)
    assert _bitwise_equal(out, src[perm])
    assert torch.all(staging[:2] == 0) and torch.all(staging[6:] == 0)


def test_layers_as_views_of_one_allocation() -> None:
    device = _device()
    gen = torch.Generator().manual_seed(4)
    layout = _layout(torch.float16)
    big = torch.randn((layout.num_layers, NUM_BLOCKS, *layout.pool_block_shape()), generator=gen)
    caches = list(big.to(device=device, dtype=torch.float16).unbind(0))
    ids = torch.tensor([11, 0, 5])
    out = torch.empty((3, *layout.block_shape), dtype=torch.float16, device=device)
    ref = torch.empty_like(out)
    gather_blocks_triton(caches, ids, out, layout)
    gather_blocks_torch(caches, ids, ref, layout)
    assert _bitwise_equal(out, ref)


def test_empty_block_ids_is_a_no_op() -> None:
    device = _device()
    layout = _layout(torch.float32)
    caches = _pool(layout, torch.Generator().manual_seed(5), device)
    out = torch.zeros((2, *layout.block_shape), device=device)
    gather_blocks_triton(caches, torch.empty(0, dtype=torch.int64), out, layout)
    assert torch.all(out == 0)


def test_bad_arguments_raise_value_error() -> None:
    device = _device()
    layout = _layout(torch.float32)
    caches = _pool(layout, torch.Generator().manual_seed(6), device)
    out = torch.zeros((2, *layout.block_shape), device=device)
    with pytest.raises(ValueError, match="pool has 12 blocks"):
        gather_blocks_triton(caches, torch.tensor([0, NUM_BLOCKS]), out, layout)
    with pytest.raises(ValueError, match="expected \\[>= 3"):
        gather_blocks_triton(caches, torch.tensor([0, 1, 2]), out, layout)
    with pytest.raises(ValueError, match="must be torch.float32"):
        gather_blocks_triton(caches, torch.tensor([0]), out.half(), layout)
    with pytest.raises(ValueError, match="layer caches"):
        gather_blocks_triton(caches[:2], torch.tensor([0]), out, layout)
    with pytest.raises(ValueError, match="contiguous"):
        bad = [c.transpose(2, 3).contiguous().transpose(2, 3) for c in caches]
        gather_blocks_triton(bad, torch.tensor([0]), out, layout)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gather_scatter_on_cuda_large_blocks() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiled-kernel test; run without TRITON_INTERPRET=1")
    layout = KVLayout(
        num_layers=4, block_size=16, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16
    )
    caches = [
        torch.randn((64, *layout.pool_block_shape()), device="cuda", dtype=torch.bfloat16)
        for _ in range(layout.num_layers)
    ]
    ids = torch.randperm(64, device="cuda")[:20]
    out = torch.empty((20, *layout.block_shape), dtype=torch.bfloat16, device="cuda")
    ref = torch.empty_like(out)
    gather_blocks_triton(caches, ids, out, layout)
    gather_blocks_torch(caches, ids, ref, layout)
    assert torch.equal(out, ref)
    fresh = [torch.zeros_like(c) for c in caches]
    scatter_blocks_triton(fresh, ids, out, layout)
    for got, want in zip(fresh, caches):
        assert torch.equal(got[ids], want[ids])
