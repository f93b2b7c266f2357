"""Every GPU table in one command: long-context TTFT against transformers, decode against the
HBM roofline, prefill with the offload running, and disaggregated against colocated serving.

    strata bench gpu --out DIR                 # on the GPU machine: the real sizes (8B, bf16)
    strata bench gpu --quick --out DIR         # anywhere: model tiny, short prompts (CPU CI)
    strata bench gpu --sections ttft,decode    # a subset (ttft, decode, offload, disagg)

Sections, one process tree (each one's failure is recorded and the others still run):

1. ``ttft`` -- for each length (8K/32K/64K/128K): Hugging Face transformers (``LlamaForCausalLM``,
   SDPA, ``logits_to_keep=1``) on the engine's very weights, then Strata cold, warm from HBM,
   from host and from disk (``bench.ttft``'s checked cycle: each warm run must be served by its
   tier with the cold token). Floors = KV bytes / bandwidth measured in this run: an HBM copy,
   a pinned host -> GPU copy (on a CPU: the host tier's probe), the disk tier's probe. The
   tiers are sized for the longest prompt and each prompt is dropped after its cycle.
2. ``decode`` -- ms per step at batch 1 and tokens/s at 8/32/64, CUDA-graph decode beside eager
   decode, each beside the HBM roofline (``bench.decode``); on a CPU eager only.
3. ``offload`` -- prefill TTFT with the pool -> host offload running against no store
   (``bench.offload``).
4. ``disagg`` -- TTFT through a service this run starts (one prefill and one decode worker; the
   KV handed from one to the other) against the colocated in-process engine (section 1's runs,
   or its own at ``--disagg-length``), with the handoff's bytes and speed (``bench.ttft``'s
   service mode).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bench import decode as decode_bench
from bench import offload as offload_bench
from bench import ttft as ttft_bench
from bench.common import (
    EngineSizes,
    add_run_flags,
    machine_info,
    new_parser,
    parse_ints,
    report,
)
from bench.gpu_report import plot, render_table

SECTIONS = ("ttft", "decode", "offload", "disagg")
FULL = {"model": "llama-3.1-8b", "dtype": "bfloat16", "lengths": "8192,32768,65536,131072",
        "batches": "1,8,32,64", "steps": 32, "prompt_tokens": 128, "offload_length": 32768,
        "disagg_length": 32768, "repeats": 1}
QUICK = {"model": "tiny", "dtype": "auto", "lengths": "256,1024", "batches": "1,8", "steps": 4,
         "prompt_tokens": 32, "offload_length": 1024, "disagg_length": 256, "repeats": 1}


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("bench.gpu", __doc__)
    p.set_defaults(model=None, dtype=None)
    p.add_argument("--sections", default=",".join(SECTIONS), help="which tables to run")
    p.add_argument("--lengths", default=None, help="TTFT prompt lengths (8192,...,131072)")
    p.add_argument("--repeats", type=int, default=None, help="runs per TTFT length (1)")
    p.add_argument("--batches", default=None, help="decode batch sizes (1,8,32,64)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (32)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="decode prompt length (128)")
    p.add_argument("--offload-length", type=int, default=None, help="offload prompt (32768)")
    p.add_argument("--disagg-length", type=int, default=None, help="service prompt (32768)")
    p.add_argument("--max-batched-tokens", type=int, default=2048, help="prefill chunk size")
    p.add_argument("--no-peer", action="store_true", help="skip Hugging Face transformers")
    add_run_flags(p, "model tiny, short prompts: the CPU form")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _resolve(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run(args)
    report(args.out, "gpu", result, render_table, plot)
    return 1 if result["errors"] else 0


def _resolve(args: argparse.Namespace) -> None:
    if not args.quick and not torch.cuda.is_available():
        raise ValueError("the full sizes need CUDA; on a CPU run it with --quick")
    if args.server or args.start_service:
        raise ValueError("bench gpu starts its own service (section disagg)")
    base = QUICK if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.lengths = parse_ints(str(args.lengths), "--lengths")
    from bench.service import check_lengths

    check_lengths(args.model, args.lengths)  # the longest prompt may fill the whole window
    args.batches = parse_ints(str(args.batches), "--batches")
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.repeats < 1 or args.steps < 1:
        raise ValueError("--repeats and --steps must be at least 1")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from engine.loader import load_model

    t0 = time.perf_counter()
    loaded = load_model(args.model, args.dtype, "auto", args.seed)
    out: dict[str, Any] = {
        "benchmark": "gpu", "machine": machine_info(),
        "config": {"model": args.model, "dtype": str(loaded.dtype), "device": str(loaded.device),
                   "quick": args.quick, "sections": args.sections, "lengths": args.lengths,
                   "repeats": args.repeats, "batches": args.batches, "steps": args.steps,
                   "prompt_tokens": args.prompt_tokens, "offload_length": args.offload_length,
                   "disagg_length": args.disagg_length,
                   "max_batched_tokens": args.max_batched_tokens, "seed": args.seed},
        "sections": {}, "section_seconds": {"load_model": time.perf_counter() - t0},
        "errors": {},
    }
    steps: dict[str, Callable[[], Any]] = {
        "ttft": lambda: ttft_section(args, loaded),
        "decode": lambda: decode_section(args, loaded),
        "offload": lambda: offload_bench.run(_ns(args), [args.offload_length], 3 if not
                                             args.quick else 2, loaded=loaded),
        "disagg": lambda: disagg_section(args, out["sections"].get("ttft")),
    }
    for name in SECTIONS:
        if name not in args.sections:
            continue
        if name == "disagg":  # the service's workers need the GPU memory this process holds
            del loaded
            _free()
        start = time.perf_counter()
        try:
            out["sections"][name] = steps[name]()
        except Exception as e:  # noqa: BLE001 - recorded; the other sections still run
            traceback.print_exc()
            out["errors"][name] = f"{type(e).__name__}: {e}"
        out["section_seconds"][name] = time.perf_counter() - start
        _free()
    return out


def _ns(args: argparse.Namespace, **over: Any) -> argparse.Namespace:  # noqa: ANN401
    """The flags the reused benchmarks read."""
    base = {"model": args.model, "dtype": args.dtype, "seed": args.seed, "out": args.out,
            "no_progress": args.no_progress, "max_batched_tokens": args.max_batched_tokens,
            "server": None, "start_service": False, "token": None, "vocab_size": None}
    return argparse.Namespace(**{**base, **over})


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- sections
def ttft_section(args: argparse.Namespace, loaded: Any) -> dict[str, Any]:  # noqa: ANN401
    from bench.hf_peer import hf_model, hf_ttft

    longest = max(args.lengths)
    sizes = EngineSizes(pool_tokens=longest + 256, host_tokens=longest + longest // 8 + 256,
                        disk_tokens=longest + longest // 2 + 256, max_model_len=longest + 2,
                        max_batched_tokens=args.max_batched_tokens)
    peer = None
    if not args.no_peer:
        hf = hf_model(loaded)

        def peer(prompt: list[int]) -> tuple[float | None, int | None]:
            try:
                return hf_ttft(hf, prompt, loaded.device)
            except torch.cuda.OutOfMemoryError:
                _free()
                return None, None
    res = ttft_bench.run_inprocess(_ns(args), args.lengths, args.repeats, sizes=sizes,
                                   loaded=loaded, clear=True, peer=peer)
    bw = dict(res["bandwidth_gbps"])
    if loaded.device.type == "cuda":
        bw["host"] = h2d_bandwidth(loaded.device)  # a warm-from-host load crosses the link
    rows = []
    for r in res["summary"]:
        row = dict(r)
        for tier in ("device", "host", "disk"):
            row[f"{tier}_floor_s"] = r["kv_bytes"] / (bw[tier] * 1e9)
            row[f"{tier}_over_floor"] = r[f"{tier}_s"] / row[f"{tier}_floor_s"]
        peers = [s for s in res["samples"] if s["mode"] == "peer" and s["length"] == r["length"]]
        times = sorted(s["ttft_s"] for s in peers if s["ttft_s"] is not None)
        row["peer_s"] = times[len(times) // 2] if times else None
        colds = {s["repeat"]: s["output_token_ids"] for s in res["samples"]
                 if s["mode"] == "cold" and s["length"] == r["length"]}
        row["peer_same_token"] = all(s["output_token_ids"] == colds[s["repeat"]] for s in peers)
        for mode in ("cold", "device", "host", "disk"):
            row[f"peer_over_{mode}"] = row["peer_s"] / r[f"{mode}_s"] if row["peer_s"] else None
        rows.append(row)
    res["bandwidth_gbps"] = bw
    res["summary"] = rows
    res["peer"] = None if args.no_peer else "transformers LlamaForCausalLM (sdpa)"
    return res


def decode_section(args: argparse.Namespace, loaded: Any) -> dict[str, Any]:  # noqa: ANN401
    ns = _ns(args)
    out: dict[str, Any] = {}
    out["eager"] = decode_bench.run(ns, args.batches, args.prompt_tokens, args.steps,
                                    loaded=loaded, cuda_graphs=False)
    if loaded.device.type == "cuda":
        out["graphs"] = decode_bench.run(ns, args.batches, args.prompt_tokens, args.steps,
                                         loaded=loaded, cuda_graphs=True)
    return out


def disagg_section(args: argparse.Namespace, ttft: dict[str, Any] | None) -> dict[str, Any]:
    from bench.handoff import HANDOFF_TOKENS
    from bench.service import local_service, server_target
    from bench.ttft_server import run_handoff_only, run_server

    length = args.disagg_length
    sizes = EngineSizes(pool_tokens=2 * (length + 256), host_tokens=2 * length + 256,
                        disk_tokens=2 * length + 512, max_model_len=length + HANDOFF_TOKENS,
                        max_batched_tokens=args.max_batched_tokens)
    local = None
    if ttft is not None and length in ttft["config"]["lengths"]:
        local = next(r for r in ttft["summary"] if r["length"] == length)
    if local is None:
        res = ttft_bench.run_inprocess(_ns(args), [length], args.repeats, sizes=sizes, clear=True)
        local = res["summary"][0]
        _free()
    ns = _ns(args, start_service=True)
    with server_target(ns, sizes) as target:
        served = run_server(ns, target, [length], args.repeats)
    # The same handoff prompts through a colocated service (one worker prefills and decodes).
    with local_service(ns.model, ns.dtype, sizes, num_prefill=0) as colo:
        colocated = run_handoff_only(ns, colo, [length], args.repeats, "colocated")
    srv = served["summary"][0]
    ratios = {f"{m}_ratio": srv[f"{m}_s"] / local[f"{m}_s"]
              for m in ("cold", "device", "host", "disk")}
    handoff = served["handoff"]["summary"][0]
    return {"length": length, "colocated": local, "disaggregated": srv, **ratios,
            "kv_transfer": served.get("kv_transfer"), "handoff": handoff,
            "colocated_handoff": colocated["summary"][0],
            # the goal: exposed handoff <= 10% of the prefill time (cold TTFT, disaggregated)
            "exposed_over_prefill": handoff["exposed_s"] / handoff["ttft_s"],
            "service": served}


def h2d_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """GB/s of one pinned host -> GPU copy of ``nbytes`` (best of 5)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


if __name__ == "__main__":
    sys.exit(main())
