"""The fused Triton ops (RMSNorm + residual, SiLU-and-mul, RoPE + KV write) and the
batch-invariant GEMM against their torch forms, under TRITON_INTERPRET=1 on CPU; the CPU form
of the batch-invariant projection gives every row the same bits in any batch."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest
import torch

from engine import ops
from engine.matmul import invariant_linear
from engine.rope import RotaryEmbedding

pytest.importorskip("triton")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _device() -> torch.device:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET is off and there is no CUDA device")
    return torch.device("cuda")


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    tol = TOL[want.dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_with_and_without_residual(dtype: torch.dtype) -> None:
    dev = _device()
    gen = torch.Generator().manual_seed(0)
    x, res = (torch.randn((5, 96), generator=gen).to(dtype).to(dev) for _ in range(2))
    w = (1 + 0.1 * torch.randn(96, generator=gen)).to(dtype).to(dev)
    for residual in (None, res):
        got, got_res = ops.rms_norm(x, w, 1e-5, residual, fused=True)
        want, want_res = ops.rms_norm(x, w, 1e-5, residual)
        _close(got, want)
        if residual is None:
            assert got_res is None and want_res is None
        else:
            assert got_res is not None and want_res is not None
            _close(got_res, want_res)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    gate_up = torch.randn((4, 2 * 80), generator=gen).to(dtype).to(_device())
    got = ops.silu_mul(gate_up, fused=True)
    assert got.shape == (4, 80) and got.dtype == dtype  # half the width: gate * up
    _close(got, ops.silu_mul(gate_up))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_kv_write(dtype: torch.dtype) -> None:
    dev = _device()
    gen = torch.Generator().manual_seed(2)
    h_q, h_kv, d, bs, t = 6, 2, 16, 4, 7
    rotary = RotaryEmbedding(d, 10000.0, None).to(dev)
    positions = torch.tensor([0, 1, 2, 9, 10, 40, 41], device=dev)
    cos, sin = rotary.cos_sin(positions, dtype)
    qkv = torch.randn((t, (h_q + 2 * h_kv) * d), generator=gen).to(dtype).to(dev)
    blocks = torch.tensor([3, 3, 3, 1, 1, 0, 0], device=dev)
    offs = torch.tensor([0, 1, 2, 1, 2, 0, 1], device=dev)
    caches = [torch.zeros((5, 2, bs, h_kv, d), dtype=dtype, device=dev) for _ in range(2)]
    want = ops.rope_write_kv(qkv.clone(), cos, sin, caches[0], blocks, offs, h_q, h_kv)
    got = ops.rope_write_kv(qkv.clone(), cos, sin, caches[1], blocks, offs, h_q, h_kv, fused=True)
    for g, w in zip(got, want):
        _close(g, w)
    _close(caches[1], caches[0])
    assert torch.count_nonzero(caches[1][2]) == 0 and torch.count_nonzero(caches[1][4]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gemm_matches_and_is_batch_invariant(dtype: torch.dtype) -> None:
    from engine.matmul_triton import linear_triton

    dev = _device()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn((70, 96), generator=gen).to(dtype).to(dev)
    w = (0.1 * torch.randn((80, 96), generator=gen)).to(dtype).to(dev)
    b = torch.randn(80, generator=gen).to(dtype).to(dev)
    full = linear_triton(x, w, b)
    _close(full, torch.nn.functional.linear(x.float(), w.float(), b.float()).to(dtype))
    for rows in (slice(0, 1), slice(5, 6), slice(3, 20), slice(64, 70)):
        assert torch.equal(linear_triton(x[rows], w, b), full[rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_invariant_linear_same_bits_in_any_batch(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    for n, k in ((688, 256), (1536, 576), (4096, 1024)):
        x = torch.randn((100, k), generator=gen).to(dtype)
        w = (0.02 * torch.randn((n, k), generator=gen)).to(dtype)
        full = invariant_linear(x, w)
        for rows in (slice(0, 1), slice(7, 8), slice(2, 19), slice(31, 100)):
            assert torch.equal(invariant_linear(x[rows], w), full[rows]), (n, k, rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_ops_and_invariant_gemm_on_cuda_real_shapes() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiled-kernel test; run without TRITON_INTERPRET=1")
    from engine.matmul_triton import linear_triton

    dev, bf16 = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    h_q, h_kv, d, hidden, t = 32, 8, 128, 4096, 300
    x, res = (torch.randn((t, hidden), generator=gen, device=dev).to(bf16) for _ in range(2))
    w = (1 + 0.1 * torch.randn(hidden, generator=gen, device=dev)).to(bf16)
    for got, want in zip(ops.rms_norm(x, w, 1e-5, res, fused=True), ops.rms_norm(x, w, 1e-5, res)):
        assert got is not None and want is not None
        _close(got, want)
    gate_up = torch.randn((t, 2 * 14336), generator=gen, device=dev).to(bf16)
    _close(ops.silu_mul(gate_up, fused=True), ops.silu_mul(gate_up))
    rotary = RotaryEmbedding(d, 500000.0, None).to(dev)
    cos, sin = rotary.cos_sin(torch.arange(1000, 1000 + t, device=dev), bf16)
    qkv = torch.randn((t, (h_q + 2 * h_kv) * d), generator=gen, device=dev).to(bf16)
    blocks = torch.arange(t, device=dev) // 16
    offs = torch.arange(t, device=dev) % 16
    caches = [torch.zeros((t // 16 + 1, 2, 16, h_kv, d), dtype=bf16, device=dev) for _ in "ab"]
    want = ops.rope_write_kv(qkv.clone(), cos, sin, caches[0], blocks, offs, h_q, h_kv)
    got = ops.rope_write_kv(qkv.clone(), cos, sin, caches[1], blocks, offs, h_q, h_kv, fused=True)
    for g, ww in zip(got, want):
        _close(g, ww)
    _close(caches[1], caches[0])
    wt = (0.02 * torch.randn((6144, hidden), generator=gen, device=dev)).to(bf16)
    full = linear_triton(x, wt)
    _close(full, torch.nn.functional.linear(x, wt))
    for rows in (slice(0, 1), slice(7, 8), slice(3, 67), slice(100, 300)):
        assert torch.equal(linear_triton(x[rows], wt), full[rows]), rows
