"""Every GPU table in one command, each section in its own process under its own time limit.

    strata bench gpu --out DIR                 # on a CUDA machine: the real sizes (8B, bf16)
    strata bench gpu --out DIR --budget-s 500  # all sections within 500 s (one device call)
    strata bench gpu --quick --out DIR         # anywhere: model tiny, short prompts (CPU CI)
    strata bench gpu --sections ttft,decode    # a subset, in this order

Sections, in the default order (``bench.gpu_sections``; the most wanted first, so a budget cut
drops the least wanted):

1. ``correctness`` -- the trained ``smollm2-135m`` in bf16 (``tiny`` with ``--quick``): the same
   greedy text cold, warm from every tier and after a prefill -> decode handoff, bit-identical
   logits in deterministic mode, and transformers' logits and greedy text on the same weights.
2. ``ttft`` -- 8K and 32K: transformers (SDPA, ``logits_to_keep=1``) on the engine's very
   weights, then Strata cold, warm from HBM, host and disk, each warm run gated on the cold
   run's logits; floors = KV bytes / bandwidth measured in the run.
3. ``ttft-long`` -- 128K (``--long-lengths``; 64K too if asked): transformers, cold, warm from
   HBM and host (the disk tier has its own benchmark).
4. ``decode`` -- ms/step at batch 1 and tokens/s at 8/32/64, CUDA graphs beside eager, beside
   the HBM roofline of the bytes a step reads (``bench.decode``).
5. ``determinism`` -- what ``engine: {deterministic: true}`` costs: cold and warm TTFT and decode
   steps with it and without, and its warm runs checked bit-identical.
6. ``kernels`` -- the attention paths, the fused ops and the batch-invariant GEMM against torch
   (``bench.kernels_gpu``): which path is the fastest on this GPU.
7. ``disagg`` -- TTFT through a service this run starts (one prefill, one decode worker) against
   the colocated engine, with the handoff's bytes and speed.
8. ``offload`` -- prefill with the pool -> host offload running against no store.

The parent process runs each section as ``python -m bench.gpu --run-section NAME`` with a time
limit (``LIMITS_S``, shortened to what is left of ``--budget-s``); a section writes its summary,
``gpu-section-NAME.json`` under ``--out`` (its per-request samples beside it, ``bench.run_files``),
when it finishes, so a section that is killed or fails costs only itself. The parent then writes
the run's summary (``gpu-*.json``, ``.png``; samples in ``gpu-*.samples.json.gz``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any

import torch

from bench import run_files
from bench.common import add_run_flags, machine_info, new_parser, parse_ints, report
from bench.gpu_report import plot, render_table

SECTIONS = ("correctness", "ttft", "ttft-long", "decode", "determinism", "kernels", "disagg",
            "offload")
LIMITS_S = {"correctness": 120, "ttft": 180, "ttft-long": 180, "decode": 90, "determinism": 120,
            "disagg": 180, "kernels": 90, "offload": 90}
QUICK_LIMIT_S = 600  # on a CPU everything is slower; the quick sizes are small
FULL = {"model": "llama-3.1-8b", "dtype": "bfloat16", "lengths": "8192,32768",
        "long_lengths": "131072", "batches": "1,8,32,64", "steps": 32, "prompt_tokens": 128,
        "offload_length": 32768, "disagg_length": 8192, "repeats": 1,
        "check_model": "smollm2-135m", "determinism_length": 8192}
QUICK = {"model": "tiny", "dtype": "auto", "lengths": "256,1024", "long_lengths": "2048",
         "batches": "1,8", "steps": 4, "prompt_tokens": 32, "offload_length": 1024,
         "disagg_length": 256, "repeats": 1, "check_model": "tiny", "determinism_length": 512}


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("bench.gpu", __doc__)
    p.set_defaults(model=None, dtype=None)
    p.add_argument("--sections", default=",".join(SECTIONS), help="which tables, in this order")
    p.add_argument("--budget-s", type=float, default=None,
                   help="all sections within this many seconds (later ones are skipped)")
    p.add_argument("--lengths", default=None, help="TTFT prompt lengths (8192,32768)")
    p.add_argument("--long-lengths", default=None, help="section ttft-long's lengths (131072)")
    p.add_argument("--repeats", type=int, default=None, help="runs per TTFT length (1)")
    p.add_argument("--batches", default=None, help="decode batch sizes (1,8,32,64)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (32)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="decode prompt length (128)")
    p.add_argument("--offload-length", type=int, default=None, help="offload prompt (32768)")
    p.add_argument("--disagg-length", type=int, default=None, help="service prompt (8192)")
    p.add_argument("--determinism-length", type=int, default=None, help="its prompt (8192)")
    p.add_argument("--check-model", default=None, help="model of section correctness")
    p.add_argument("--max-batched-tokens", type=int, default=2048, help="prefill chunk size")
    p.add_argument("--no-peer", action="store_true", help="skip Hugging Face transformers")
    p.add_argument("--run-section", default=None, help=argparse.SUPPRESS)  # the child's
    add_run_flags(p, "model tiny, short prompts: the CPU form")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        _resolve(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.run_section:
        return run_section(args)
    result = run(args, argv)
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
    args.long_lengths = parse_ints(str(args.long_lengths), "--long-lengths")
    from bench.service import check_lengths

    # the longest prompt may fill the whole window
    check_lengths(args.model, [*args.lengths, *args.long_lengths])
    args.batches = parse_ints(str(args.batches), "--batches")
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.repeats < 1 or args.steps < 1:
        raise ValueError("--repeats and --steps must be at least 1")


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("model", "dtype", "quick", "sections", "lengths", "long_lengths", "repeats",
            "batches", "steps", "prompt_tokens", "offload_length", "disagg_length",
            "determinism_length", "check_model", "max_batched_tokens", "budget_s", "seed")
    cfg = {k: getattr(args, k) for k in keys}
    cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg


# ---------------------------------------------------------------------------- the parent
def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    out_dir = args.out or tempfile.mkdtemp(prefix="strata-bench-gpu-")
    os.makedirs(out_dir, exist_ok=True)
    start = time.monotonic()
    result: dict[str, Any] = {"benchmark": "gpu", "machine": machine_info(),
                              "config": config_of(args), "sections": {},
                              "section_seconds": {}, "errors": {}, "skipped": {}}
    for name in args.sections:
        limit = QUICK_LIMIT_S if args.quick else LIMITS_S[name]
        if args.budget_s is not None:
            left = args.budget_s - (time.monotonic() - start)
            if left < 20:
                result["skipped"][name] = f"{left:.0f} s of the budget left"
                continue
            limit = min(limit, int(left) - 5)
        path = _section_path(out_dir, name)
        for old in (path, run_files.samples_path(path)):
            if os.path.exists(old):
                os.remove(old)
        cmd = [sys.executable, "-m", "bench.gpu", *argv, "--run-section", name, "--out", out_dir]
        t0 = time.monotonic()
        rc = _run_child(cmd, limit)
        result["section_seconds"][name] = time.monotonic() - t0
        if os.path.exists(path):
            sec = run_files.load(path)
            if "error" in sec:
                result["errors"][name] = sec["error"]
            else:
                result["sections"][name] = sec["result"]
        elif rc is None:
            result["errors"][name] = f"timed out after {limit} s"
        else:
            result["errors"][name] = f"exited with {rc} and no result"
    return result


def _run_child(cmd: list[str], limit: float) -> int | None:
    """Run a section's process; its exit code, or None when it ran past ``limit`` (killed,
    with every process it started)."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def _section_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, f"gpu-section-{name}.json")


# ---------------------------------------------------------------------------- a child
def run_section(args: argparse.Namespace) -> int:
    """Run one section in this process and write its JSON (result or error)."""
    from bench import gpu_sections

    name = args.run_section
    if name not in SECTIONS:
        print(f"error: unknown section {name!r}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    payload: dict[str, Any]
    try:
        payload = {"result": gpu_sections.RUNNERS[name](args)}
    except Exception as e:  # recorded; the parent runs the other sections
        traceback.print_exc()
        payload = {"error": f"{type(e).__name__}: {e}"}
    payload["seconds"] = time.perf_counter() - t0
    run_files.save(_section_path(args.out, name), payload)
    print(f"section {name}: {'FAILED ' + payload['error'] if 'error' in payload else 'done'} "
          f"in {payload['seconds']:.0f} s", flush=True)
    return 0 if "error" not in payload else 1


if __name__ == "__main__":
    sys.exit(main())
