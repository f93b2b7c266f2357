"""GPU micro-benchmarks of Strata's kernels against torch (section ``kernels`` of ``bench gpu``).

    python bench/kernels_gpu.py [--quick] [--out FILE.json]

8B shapes (H_q=32, H_kv=8, D=128, block_size=16, bf16); median ms by ``triton.testing.do_bench``
(L2 flushed between runs). Rows (``case``, ``path``):

- ``decode`` / ``short``: 1 / 16 queries after a long paged prefix: the split-KV kernel (the
  engine's path) against gathering the prefix and ``scaled_dot_product_attention``;
- ``chunk``: 2,048 queries after a prefix: ``sdpa-gather`` (the engine's path: gather, then
  SDPA flash with a lower-right causal mask), ``triton`` (the split-KV kernel, one partition)
  and ``sdpa-contiguous`` (the K/V already contiguous: what a non-paged engine pays);
  TFLOP/s count the causal attention's useful flops;
- ``rmsnorm+res`` / ``rope+kv`` / ``silu*up``: the fused kernels against their torch forms;
- ``gemm NxK Mrows``: the batch-invariant Triton GEMM (deterministic mode) against cuBLAS;
- ``gather`` / ``scatter``: the block copy kernels against the torch indexed copies (2 MiB
  blocks); GB/s = bytes copied.
``max_err`` is against the float32 torch reference where there is one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

H_Q, H_KV, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
DEV = "cuda"


def _ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def _row(case: str, path: str, ms: float, **extra: Any) -> dict[str, Any]:
    row = {"case": case, "path": path, "ms": ms, **extra}
    print(f"{case:<24} {path:<16} {ms:9.3f} ms  "
          + "  ".join(f"{k} {v:.3g}" for k, v in extra.items() if isinstance(v, float)), flush=True)
    return row


def _pool(ctx: int, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A shuffled pool with ``batch`` sequences of ``ctx`` tokens: (cache, block tables)."""
    pages = math.ceil(ctx / BLOCK_SIZE)
    cache = torch.randn((pages * batch + 1, 2, BLOCK_SIZE, H_KV, HEAD_DIM), generator=gen,
                        device=DEV).to(DTYPE)  # fmt: skip
    perm = torch.randperm(pages * batch, device=DEV, generator=gen).to(torch.int32)
    return cache, perm.view(batch, pages)


def _i32(xs: list[int]) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int32, device=DEV)


def _split_case(ctx: int, case: str, nq: int, batch: int,
                gen: torch.Generator) -> list[dict[str, Any]]:  # fmt: skip
    """``batch`` sequences of ``nq`` queries after ``ctx - nq`` paged tokens."""
    from engine.attention import attend_sdpa, gather_prefix
    from engine.attention_triton import paged_attention_split_kv, paged_prefill_attention_ref

    scale = HEAD_DIM**-0.5
    cache, tables = _pool(ctx, batch, gen)
    q = torch.randn((batch * nq, H_Q, HEAD_DIM), generator=gen, device=DEV).to(DTYPE)
    start = ctx - nq
    args = (q, cache, tables, _i32([i * nq for i in range(batch)]), _i32([nq] * batch),
            _i32([start] * batch))  # fmt: skip

    def split() -> torch.Tensor:
        return paged_attention_split_kv(*args, scale, max_q_len=nq, max_context_len=ctx)

    def sdpa() -> None:
        for b in range(batch):
            k, v = gather_prefix(cache, tables[b].long(), ctx)
            attend_sdpa(q[b * nq : (b + 1) * nq], k, v, start, scale)

    want = paged_prefill_attention_ref(q[:nq], cache, tables[0], start)
    err = float((split()[:nq].float() - want.float()).abs().max())
    name = f"{case} ctx={ctx} B={batch}"
    kv_gb = batch * ctx * 2 * H_KV * HEAD_DIM * 2 / 1e9
    t_split, t_sdpa = _ms(split), _ms(sdpa)
    return [_row(name, "triton split-KV", t_split, gbps=kv_gb / t_split * 1e3, max_err=err),
            _row(name, "sdpa-gather", t_sdpa, gbps=kv_gb / t_sdpa * 1e3)]


def _chunk_case(ctx: int, gen: torch.Generator, chunk: int = 2048) -> list[dict[str, Any]]:
    """A prefill chunk of ``chunk`` queries ending at ``ctx``, three ways."""
    from engine.attention import attend_sdpa, gather_prefix
    from engine.attention_triton import paged_attention_split_kv

    scale = HEAD_DIM**-0.5
    prefix = max(0, ctx - chunk)
    cache, tables = _pool(ctx, 1, gen)
    q = torch.randn((chunk, H_Q, HEAD_DIM), generator=gen, device=DEV).to(DTYPE)
    ids = tables[0].long()
    k_all, v_all = gather_prefix(cache, ids, ctx)
    flops = 4 * H_Q * HEAD_DIM * chunk * (prefix + (chunk + 1) / 2)
    name = f"chunk {chunk} after {prefix}"
    paths = {
        "sdpa-gather": lambda: attend_sdpa(q, *gather_prefix(cache, ids, ctx), prefix, scale),
        "sdpa-contiguous": lambda: attend_sdpa(q, k_all, v_all, prefix, scale),
        "triton": lambda: paged_attention_split_kv(
            q, cache, tables, _i32([0]), _i32([chunk]), _i32([prefix]), scale,
            max_q_len=chunk, max_context_len=ctx, split=False),
    }
    rows = []
    for path, fn in paths.items():
        t = _ms(fn)
        rows.append(_row(name, path, t, tflops=flops / t / 1e9))
    return rows


def attention_rows(contexts: list[int], gen: torch.Generator) -> list[dict[str, Any]]:
    rows = []
    for ctx in contexts:
        for case, nq, batch in (("decode", 1, 1), ("decode", 1, 16), ("short", 16, 1)):
            rows += _split_case(ctx, case, nq, batch, gen)
        rows += _chunk_case(ctx, gen)
    return rows


def _op_cases(t: int, gen: torch.Generator) -> list[dict[str, Any]]:
    """The fused per-token ops at ``t`` tokens, and their torch forms."""
    from engine import ops

    hidden = 4096
    x, res = (torch.randn((t, hidden), generator=gen, device=DEV).to(DTYPE) for _ in "ab")
    w = torch.ones(hidden, device=DEV, dtype=DTYPE)
    gu = torch.randn((t, 2 * 14336), generator=gen, device=DEV).to(DTYPE)
    qkv = torch.randn((t, (H_Q + 2 * H_KV) * HEAD_DIM), generator=gen, device=DEV).to(DTYPE)
    cos = torch.randn((t, 1, HEAD_DIM), generator=gen, device=DEV).to(DTYPE)
    cache = torch.zeros((t // BLOCK_SIZE + 1, 2, BLOCK_SIZE, H_KV, HEAD_DIM), dtype=DTYPE,
                        device=DEV)  # fmt: skip
    blocks = torch.arange(t, device=DEV) // BLOCK_SIZE
    offs = torch.arange(t, device=DEV) % BLOCK_SIZE
    cases: dict[str, Callable[[bool], object]] = {
        "rmsnorm+res": lambda f: ops.rms_norm(x, w, 1e-5, res, fused=f),
        "silu*up": lambda f: ops.silu_mul(gu, fused=f),
        "rope+kv": lambda f: ops.rope_write_kv(qkv, cos, cos, cache, blocks, offs, H_Q, H_KV,
                                               fused=f),
    }
    rows = []
    for name, fn in cases.items():
        for fused in (True, False):
            rows.append(_row(f"{name} T={t}", "triton" if fused else "torch",
                             _ms(lambda fn=fn, fused=fused: fn(fused))))  # fmt: skip
    return rows


def _gemm_case(n: int, k: int, m: int, gen: torch.Generator) -> list[dict[str, Any]]:
    from engine.matmul_triton import linear_triton

    w = (0.02 * torch.randn((n, k), generator=gen, device=DEV)).to(DTYPE)
    x = torch.randn((m, k), generator=gen, device=DEV).to(DTYPE)
    flops = 2 * m * n * k
    err = float((linear_triton(x, w).float() - (x.float() @ w.float().T)).abs().max())
    name = f"gemm {n}x{k} M={m}"
    t_inv = _ms(lambda: linear_triton(x, w))
    t_blas = _ms(lambda: torch.nn.functional.linear(x, w))
    return [_row(name, "triton invariant", t_inv, tflops=flops / t_inv / 1e9,
                 gbps=n * k * 2 / t_inv / 1e6, max_err=err),
            _row(name, "cublas", t_blas, tflops=flops / t_blas / 1e9,
                 gbps=n * k * 2 / t_blas / 1e6)]  # fmt: skip


def op_rows(gen: torch.Generator) -> list[dict[str, Any]]:
    rows = []
    for t in (1, 64, 2048):
        rows += _op_cases(t, gen)
    for n, k in ((6144, 4096), (28672, 4096), (4096, 14336)):
        for m in (1, 64, 2048):
            rows += _gemm_case(n, k, m, gen)
    return rows


def copy_rows(count: int, gen: torch.Generator, num_layers: int = 32) -> list[dict[str, Any]]:
    from kvstore.kernels import gather_blocks_triton, scatter_blocks_triton
    from kvstore.layout import KVLayout
    from kvstore.pool_copy import gather_blocks_torch, scatter_blocks_torch

    layout = KVLayout(num_layers=num_layers, block_size=BLOCK_SIZE, num_kv_heads=H_KV,
                      head_dim=HEAD_DIM, dtype=DTYPE)  # fmt: skip
    shape = (2 * count, *layout.pool_block_shape())
    caches = [torch.randn(shape, generator=gen, device=DEV).to(DTYPE) for _ in range(num_layers)]
    ids = torch.randperm(2 * count, device=DEV, generator=gen)[:count]
    buf = torch.empty((count, *layout.block_shape), dtype=DTYPE, device=DEV)
    nbytes = count * buf[0].numel() * buf.element_size()
    rows = []
    fns = {("gather", "triton"): gather_blocks_triton, ("gather", "torch"): gather_blocks_torch,
           ("scatter", "triton"): scatter_blocks_triton, ("scatter", "torch"): scatter_blocks_torch}
    for (op, path), fn in fns.items():
        t = _ms(lambda fn=fn: fn(caches, ids, buf, layout))
        rows.append(_row(f"{op} {count} blocks", path, t, gbps=nbytes / t / 1e6))
    return rows


def run(quick: bool = False) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise ValueError("kernels_gpu needs a CUDA GPU (the CPU checks are the tests under "
                         "TRITON_INTERPRET=1)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError("unset TRITON_INTERPRET to benchmark compiled kernels")
    gen = torch.Generator(device=DEV).manual_seed(0)
    contexts = [8192, 32768] if quick else [8192, 32768, 131072]
    rows = attention_rows(contexts, gen) + op_rows(gen) + copy_rows(64 if quick else 256, gen)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "shape": {"H_q": H_Q, "H_kv": H_KV, "D": HEAD_DIM, "block_size": BLOCK_SIZE,
                      "dtype": str(DTYPE)},
            "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = parser.parse_args()
    try:
        result = run(args.quick)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
