"""Decode throughput at batch 1, 8, 32, 64 (in-process), beside the memory-bandwidth roofline.

    python -m bench.decode --model tiny --batches 1,8,32,64 --prompt-tokens 128 --steps 32

Per batch size: the requests are prefilled first (not timed), then the decode steps are timed:
tokens/s = batch / median step time (the
mean is in the JSON too). Roofline of one step = (weight bytes + K/V bytes read at the
mean context) / measured copy bandwidth (bytes read + written of a large tensor copy). On CUDA
that is the HBM roofline; on a CPU the column is the host-memory-bandwidth analogue and is named
so. The tiered store is off here: decode does not touch it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.common import (
    EngineSizes,
    build_engine,
    format_table,
    machine_info,
    memory_copy_bandwidth,
    parse_ints,
    progress,
    pyplot,
    random_prompt,
    report,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.decode", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batches", default=None, help="batch sizes (default 1,8,32,64)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 128")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="32-token prompts, 8 steps")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        batches = parse_ints(args.batches or "1,8,32,64", "--batches")
        prompt_tokens = args.prompt_tokens or (32 if args.quick else 128)
        steps = args.steps or (8 if args.quick else 32)
        result = run(args, batches, prompt_tokens, steps)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(args.out, "decode", result, render_table, plot)
    return 0


def run(
    args: argparse.Namespace, batches: list[int], prompt_tokens: int, steps: int
) -> dict[str, Any]:
    from engine.sampling import SamplingParams

    max_b = max(batches)
    ctx = prompt_tokens + steps + 1
    sizes = EngineSizes(pool_tokens=max_b * (ctx + 32) + 256, host_tokens=0, disk_tokens=0,
                        max_model_len=ctx + 16, max_batched_tokens=max(2048, prompt_tokens))
    engine = build_engine(args.model, args.dtype, sizes, None, max_num_seqs=max_b)
    try:
        dtype, device = engine.layout.dtype, engine.device
        bandwidth = memory_copy_bandwidth(dtype, device)
        weight_bytes = sum(p.numel() * p.element_size() for p in engine.loaded.model.parameters())
        bytes_per_token = engine.layout.bytes_per_token
        sampling = SamplingParams(max_tokens=steps + 1, ignore_eos=True)
        vocab = engine.model_config.vocab_size
        bar = progress(len(batches) + 1, "decode", args.no_progress)
        _measure(engine, 1, prompt_tokens, sampling, vocab, seed=-1)  # warm-up
        bar.update(1)
        rows = []
        for b in batches:
            times = _measure(engine, b, prompt_tokens, sampling, vocab, args.seed + b)
            step_s = statistics.median(times)  # robust to a noisy neighbour on a shared machine
            mean_ctx = prompt_tokens + (len(times) + 1) / 2
            step_bytes = weight_bytes + b * mean_ctx * bytes_per_token
            roof_step = step_bytes / (bandwidth * 1e9)
            rows.append({
                "batch": b, "steps": len(times), "step_s": times, "tokens_per_s": b / step_s,
                "ms_per_step": step_s * 1e3, "mean_tokens_per_s": b * len(times) / sum(times),
                "bytes_per_step": step_bytes, "roofline_tokens_per_s": b / roof_step,
                "fraction_of_roofline": roof_step / step_s,
            })
            bar.update(1)
        bar.close()
        roof_name = "HBM roofline" if device.type == "cuda" else "host-memory-bandwidth analogue"
        return {
            "benchmark": "decode", "machine": machine_info(),
            "config": {"model": args.model, "dtype": str(dtype), "device": str(device),
                       "batches": batches, "prompt_tokens": prompt_tokens, "steps": steps,
                       "weight_bytes": weight_bytes, "kv_bytes_per_token": bytes_per_token,
                       "seed": args.seed},
            "roofline": {"name": roof_name, "copy_bandwidth_gbps": bandwidth},
            "rows": rows,
        }
    finally:
        engine.close()


def _measure(engine: Any, batch: int, prompt_tokens: int, sampling: Any, vocab: int,  # noqa: ANN401
             seed: int) -> list[float]:
    """Seconds of each decode step of ``batch`` requests, after their prefill."""
    base = f"dec-{seed}-{time.monotonic_ns()}"
    for i in range(batch):
        engine.add_request(f"{base}-{i}", random_prompt(seed * 1009 + i, prompt_tokens, vocab),
                           sampling)
    started: set[str] = set()
    while len(started) < batch:  # prefill (and any decode steps that ride along), untimed
        for out in engine.step():
            started.add(out.req_id)
    times: list[float] = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        if engine.step():
            times.append(time.perf_counter() - t0)
    return times


def render_table(result: dict[str, Any]) -> str:
    cfg, roof = result["config"], result["roofline"]
    rows = [[r["batch"], r["tokens_per_s"], r["ms_per_step"], r["roofline_tokens_per_s"],
             r["fraction_of_roofline"]] for r in result["rows"]]
    head = (f"decode, {cfg['model']} {cfg['dtype']} on {cfg['device']}, prompt "
            f"{cfg['prompt_tokens']} tokens; roofline = {roof['name']} "
            f"({roof['copy_bandwidth_gbps']:.1f} GB/s copy)")
    return head + "\n" + format_table(
        ["batch", "tok/s", "ms/step", "roofline tok/s", "of roofline"], rows)


def plot(result: dict[str, Any], path: str) -> None:
    plt = pyplot()
    rows = result["rows"]
    xs = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["tokens_per_s"] for r in rows], "o-", label="measured")
    ax.plot(xs, [r["roofline_tokens_per_s"] for r in rows], "--", label=result["roofline"]["name"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(f"decode throughput, {result['config']['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
