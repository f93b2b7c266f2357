"""GPU benchmark of Strata's Triton kernels against torch baselines (not run in CI).

    python bench/kernels_gpu.py [--quick] [--out bench/results/kernels_gpu.json]

Tables printed and written as JSON:
- decode: ``paged_decode_attention`` (split-K) vs gather + ``scaled_dot_product_attention``
  (bf16, GQA), 8B shape (H_q=32, H_kv=8, D=128, block_size=16), contexts 8K-128K; GB/s counts
  the K/V bytes the kernel must read. ``max_err`` is against the float32 reference.
- prefill: ``paged_prefill_attention`` of a chunk over a cached prefix vs gather + masked SDPA.
- gather/scatter: ``gather_blocks_triton`` / ``scatter_blocks_triton`` vs the torch indexed-copy
  reference on 2 MiB blocks (32 layers x 16 tokens x 8 heads x 128, bf16); GB/s = bytes copied.
Timings come from ``triton.testing.do_bench`` (median ms, L2 flushed between runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvstore.layout import KVLayout, gather_blocks_torch, scatter_blocks_torch  # noqa: E402

H_Q, H_KV, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
DEVICE = "cuda"  # module-level so a smoke run can point it elsewhere


def _ms(fn: Callable[[], object]) -> float:
    import triton.testing

    if DEVICE == "cpu":  # smoke runs under the interpreter: one timed call
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _paged_pool(
    lens: list[int], gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:  # kv_cache [N, 2, bs, H_kv, D], block_tables [B, M]
    pages = [math.ceil(n / BLOCK_SIZE) for n in lens]
    num_blocks = sum(pages)
    cache = torch.empty((num_blocks, 2, BLOCK_SIZE, H_KV, HEAD_DIM), dtype=DTYPE, device=DEVICE)
    cache.normal_(generator=gen)
    perm = torch.randperm(num_blocks, device=DEVICE, generator=gen).to(torch.int32)
    tables = torch.zeros((len(lens), max(pages)), dtype=torch.int32, device=DEVICE)
    used = 0
    for b, n in enumerate(pages):
        tables[b, :n] = perm[used : used + n]
        used += n
    return cache, tables


def _gather_dense(cache: torch.Tensor, table: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    # -> K, V: [1, H_kv, n, D] for SDPA
    kv = cache.index_select(0, table[: math.ceil(n / BLOCK_SIZE)].long())
    k = kv[:, 0].reshape(-1, H_KV, HEAD_DIM)[:n].transpose(0, 1).unsqueeze(0)
    v = kv[:, 1].reshape(-1, H_KV, HEAD_DIM)[:n].transpose(0, 1).unsqueeze(0)
    return k, v


def _decode_case(ctx_len: int, batch: int, gen: torch.Generator) -> dict:
    from engine.attention_triton import paged_decode_attention, paged_decode_attention_ref

    lens = [ctx_len] * batch
    cache, tables = _paged_pool(lens, gen)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn((batch, H_Q, HEAD_DIM), device=DEVICE, generator=gen).to(DTYPE)
    got = paged_decode_attention(q, cache, tables, ctx, max_context_len=ctx_len)
    want = paged_decode_attention_ref(q[:1], cache, tables[:1], ctx[:1])
    err = (got[:1].float() - want.float()).abs().max().item()

    def sdpa() -> None:
        for b in range(batch):
            k, v = _gather_dense(cache, tables[b], ctx_len)
            qb = q[b].view(1, H_Q, 1, HEAD_DIM)
            torch.nn.functional.scaled_dot_product_attention(qb, k, v, enable_gqa=True)

    t_kernel = _ms(lambda: paged_decode_attention(q, cache, tables, ctx))
    t_torch = _ms(sdpa)
    kv_bytes = batch * ctx_len * 2 * H_KV * HEAD_DIM * cache.element_size()
    row = dict(context=ctx_len, batch=batch, triton_ms=t_kernel, torch_sdpa_ms=t_torch,
               triton_gbps=kv_bytes / t_kernel / 1e6, speedup=t_torch / t_kernel,
               max_err=err)  # fmt: skip
    print(
        f"decode  ctx={ctx_len:>6} B={batch:>2}  triton {t_kernel:8.3f} ms "
        f"({row['triton_gbps']:7.1f} GB/s)  torch {t_torch:8.3f} ms  "
        f"x{row['speedup']:5.2f}  err {err:.2e}",
        flush=True,
    )
    return row


def _prefill_case(q_start: int, chunk: int, gen: torch.Generator) -> dict:
    from engine.attention_triton import paged_prefill_attention

    total = q_start + chunk
    cache, tables = _paged_pool([total], gen)
    q = torch.randn((chunk, H_Q, HEAD_DIM), device=DEVICE, generator=gen).to(DTYPE)
    pos = torch.arange(q_start, total, device=DEVICE)
    mask = torch.arange(total, device=DEVICE)[None, :] <= pos[:, None]  # [T, S]

    def sdpa() -> torch.Tensor:
        # K/V repeated to H_q heads: a masked GQA call could fall back to the math kernel,
        # which materialises [H_q, T, S] scores
        k, v = _gather_dense(cache, tables[0], total)
        k, v = k.repeat_interleave(H_Q // H_KV, 1), v.repeat_interleave(H_Q // H_KV, 1)
        qd = q.transpose(0, 1).unsqueeze(0)  # [1, H_q, T, D]
        o = torch.nn.functional.scaled_dot_product_attention(qd, k, v, attn_mask=mask)
        return o[0].transpose(0, 1)  # [T, H_q, D]

    got = paged_prefill_attention(q, cache, tables[0], q_start)
    err = (got.float() - sdpa().float()).abs().max().item()
    t_kernel = _ms(lambda: paged_prefill_attention(q, cache, tables[0], q_start))
    t_torch = _ms(sdpa)
    flops = 4 * H_Q * HEAD_DIM * chunk * (q_start + (chunk + 1) / 2)  # causal QK^T + PV
    row = dict(q_start=q_start, chunk=chunk, triton_ms=t_kernel, torch_sdpa_ms=t_torch,
               triton_tflops=flops / t_kernel / 1e9, speedup=t_torch / t_kernel,
               max_err_vs_sdpa=err)  # fmt: skip
    print(
        f"prefill start={q_start:>6} T={chunk:>5}  triton {t_kernel:8.3f} ms "
        f"({row['triton_tflops']:6.1f} TFLOP/s)  torch {t_torch:8.3f} ms  "
        f"x{row['speedup']:5.2f}  err {err:.2e}",
        flush=True,
    )
    return row


def _copy_case(
    op: str, caches: list[torch.Tensor], ids: torch.Tensor, buf: torch.Tensor, layout: KVLayout
) -> dict:
    from kvstore.kernels import gather_blocks_triton, scatter_blocks_triton

    kernel, torch_fn = {
        "gather": (gather_blocks_triton, gather_blocks_torch),
        "scatter": (scatter_blocks_triton, scatter_blocks_torch),
    }[op]
    t_kernel = _ms(lambda: kernel(caches, ids, buf, layout))
    t_torch = _ms(lambda: torch_fn(caches, ids, buf, layout))
    n, block_nbytes = ids.numel(), buf[0].numel() * buf.element_size()
    row = dict(op=op, num_blocks=n, block_mib=block_nbytes / 2**20, triton_ms=t_kernel,
               torch_ms=t_torch, triton_gbps=n * block_nbytes / t_kernel / 1e6,
               torch_gbps=n * block_nbytes / t_torch / 1e6)  # fmt: skip
    print(
        f"{op:<7} n={n:>4} x {row['block_mib']:.0f} MiB  triton {t_kernel:7.3f} ms "
        f"({row['triton_gbps']:7.1f} GB/s)  torch {t_torch:7.3f} ms "
        f"({row['torch_gbps']:7.1f} GB/s)",
        flush=True,
    )
    return row


def bench_gather_scatter(
    counts: list[int], gen: torch.Generator, num_layers: int = 32
) -> list[dict]:
    from kvstore.kernels import gather_blocks_triton

    layout = KVLayout(num_layers=num_layers, block_size=BLOCK_SIZE, num_kv_heads=H_KV,
                      head_dim=HEAD_DIM, dtype=DTYPE)  # fmt: skip
    num_blocks = 2 * max(counts)
    shape = (num_blocks, *layout.pool_block_shape())
    caches = [torch.empty(shape, dtype=DTYPE, device=DEVICE) for _ in range(num_layers)]
    for cache in caches:
        cache.normal_(generator=gen)
    rows = []
    for n in counts:
        ids = torch.randperm(num_blocks, device=DEVICE, generator=gen)[:n]
        buf = torch.empty((n, *layout.block_shape), dtype=DTYPE, device=DEVICE)
        ref = torch.empty_like(buf)
        gather_blocks_triton(caches, ids, buf, layout)
        gather_blocks_torch(caches, ids, ref, layout)
        assert torch.equal(buf, ref), "gather kernel disagrees with the torch reference"
        rows += [_copy_case(op, caches, ids, buf, layout) for op in ("gather", "scatter")]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        msg = (
            "kernels_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); run it on a GPU"
        )
        print(
            msg + " machine. The CPU tests (TRITON_INTERPRET=1) cover correctness.", file=sys.stderr
        )
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET to benchmark compiled kernels", file=sys.stderr)
        return 2
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    contexts = [8192, 32768] if args.quick else [8192, 32768, 65536, 131072]
    batches = [1, 8] if args.quick else [1, 4, 16]
    prefill = (
        [(0, 2048), (6144, 2048)] if args.quick else [(0, 4096), (28672, 4096), (126976, 4096)]
    )
    counts = [64] if args.quick else [16, 64, 256]
    result = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=__import__("triton").__version__, host=platform.node(),
        time=time.strftime("%Y-%m-%dT%H:%M:%S"),
        shape=dict(H_q=H_Q, H_kv=H_KV, D=HEAD_DIM, block_size=BLOCK_SIZE, dtype=str(DTYPE)),
        decode=[_decode_case(c, b, gen) for c in contexts for b in batches],
        prefill=[_prefill_case(start, chunk, gen) for start, chunk in prefill],
        gather_scatter=bench_gather_scatter(counts, gen),
    )  # fmt: skip
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results",
        f"kernels_gpu_{time.strftime('%Y%m%d_%H%M%S')}.json",
    )  # fmt: skip
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
