"""The sections of ``strata bench gpu`` (``bench.gpu`` runs each in its own process).

Each takes the parsed flags and returns its summary as a JSON-able dict; a failed check of its
own is recorded in the dict (``passed``), an exception fails the section.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from typing import Any

import torch

from bench import decode as decode_bench
from bench import offload as offload_bench
from bench import ttft as ttft_bench
from bench.common import EngineSizes, machine_info


def _ns(args: argparse.Namespace, **over: Any) -> argparse.Namespace:
    """The flags the reused benchmarks read."""
    base = {"model": args.model, "dtype": args.dtype, "seed": args.seed, "out": args.out,
            "no_progress": args.no_progress, "max_batched_tokens": args.max_batched_tokens,
            "server": None, "start_service": False, "token": None, "vocab_size": None}
    return argparse.Namespace(**{**base, **over})


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _load(args: argparse.Namespace) -> Any:  # a LoadedModel
    from engine.loader import load_model

    return load_model(args.model, args.dtype, "auto", args.seed)


# ---------------------------------------------------------------------------- TTFT
def ttft_section(args: argparse.Namespace) -> dict[str, Any]:
    return _ttft(args, args.lengths, ttft_bench.MODES, None)


def ttft_long_section(args: argparse.Namespace) -> dict[str, Any]:
    return _ttft(args, args.long_lengths, ("cold", "device", "host"), min(args.lengths))


def _ttft(args: argparse.Namespace, lengths: list[int], modes: tuple[str, ...],
          warmup: int | None) -> dict[str, Any]:  # fmt: skip
    from bench.hf_peer import hf_model, hf_ttft

    loaded = _load(args)
    longest = max(lengths)
    disk = longest + longest // 2 + 256 if "disk" in modes else 4096
    sizes = EngineSizes(pool_tokens=longest + 256, host_tokens=longest + longest // 8 + 256,
                        disk_tokens=disk, max_model_len=longest + 2,
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
    res = ttft_bench.run_inprocess(_ns(args), lengths, args.repeats, sizes=sizes, loaded=loaded,
                                   clear=True, peer=peer, modes=modes, warmup_length=warmup)
    bw = dict(res["bandwidth_gbps"])
    if loaded.device.type == "cuda":
        bw["host"] = h2d_bandwidth(loaded.device)  # a warm-from-host load crosses the link
    rows = []
    for r in res["summary"]:
        row = dict(r)
        for tier in [m for m in modes if m != "cold"]:
            row[f"{tier}_floor_s"] = r["kv_bytes"] / (bw[tier] * 1e9)
            row[f"{tier}_over_floor"] = r[f"{tier}_s"] / row[f"{tier}_floor_s"]
        mine = [s for s in res["samples"] if s["length"] == r["length"]]
        peers = [s for s in mine if s["mode"] == "peer"]
        times = sorted(s["ttft_s"] for s in peers if s["ttft_s"] is not None)
        row["peer_s"] = times[len(times) // 2] if times else None
        colds = {s["repeat"]: s["output_token_ids"] for s in mine if s["mode"] == "cold"}
        row["peer_same_token"] = all(s["output_token_ids"] == colds[s["repeat"]] for s in peers)
        row["peer_over_cold"] = r["cold_s"] / row["peer_s"] if row["peer_s"] else None
        gaps = [s["logits"] for s in mine if "logits" in s]
        row["warm_logits_max_rel"] = max((g["rel"] for g in gaps), default=None)
        row["warm_tokens_flipped"] = sum(not g["same_token"] for g in gaps)
        rows.append(row)
    res["bandwidth_gbps"] = bw
    res["summary"] = rows
    res["modes"] = list(modes)
    res["peer"] = None if args.no_peer else "transformers LlamaForCausalLM (sdpa)"
    return res


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


# ---------------------------------------------------------------------------- decode, offload
def decode_section(args: argparse.Namespace) -> dict[str, Any]:
    loaded = _load(args)
    ns = _ns(args)
    out: dict[str, Any] = {}
    out["eager"] = decode_bench.run(ns, args.batches, args.prompt_tokens, args.steps,
                                    loaded=loaded, cuda_graphs=False)
    if loaded.device.type == "cuda":
        out["graphs"] = decode_bench.run(ns, args.batches, args.prompt_tokens, args.steps,
                                         loaded=loaded, cuda_graphs=True)
    return out


def offload_section(args: argparse.Namespace) -> dict[str, Any]:
    return offload_bench.run(_ns(args), [args.offload_length], 2 if args.quick else 3,
                             loaded=_load(args))


# ---------------------------------------------------------------------------- determinism
def determinism_section(args: argparse.Namespace) -> dict[str, Any]:
    """Cold and warm TTFT (HBM, host) and decode, default against deterministic mode; the
    deterministic warm runs are gated bit-identical, the default ones by the logits gate."""
    loaded = _load(args)
    length = args.determinism_length
    # the chunk grid deterministic mode reuses in whole: the engine's chunk (a short one for the
    # quick form's short prompt, so that warm runs still reuse most of it)
    chunk = 128 if args.quick else args.max_batched_tokens
    sizes = EngineSizes(pool_tokens=length + 256, host_tokens=length + length // 8 + 256,
                        disk_tokens=4096, max_model_len=length + 2, max_batched_tokens=chunk)
    batches = [b for b in (1, max(args.batches)) if b in args.batches] or args.batches[:1]
    out: dict[str, Any] = {"length": length, "chunk": chunk, "batches": batches}
    for mode, det in (("default", False), ("deterministic", True)):
        ttft = ttft_bench.run_inprocess(
            _ns(args), [length], args.repeats, sizes=sizes, loaded=loaded, clear=True,
            modes=("cold", "device", "host"), engine_kw={"deterministic": det})
        dec = decode_bench.run(_ns(args), batches, args.prompt_tokens, args.steps, loaded=loaded,
                               deterministic=det)
        row = ttft["summary"][0]
        gaps = [s["logits"] for s in ttft["samples"] if "logits" in s]
        out[mode] = {"cold_s": row["cold_s"], "device_s": row["device_s"], "host_s": row["host_s"],
                     "cached_tokens": max(s["num_cached_tokens"] for s in ttft["samples"]),
                     "warm_logits_max_abs": max((g["max_abs"] for g in gaps), default=None),
                     "decode_ms": {r["batch"]: r["ms_per_step"] for r in dec["rows"]}}
        _free()
    d, base = out["deterministic"], out["default"]
    out["cost"] = {"cold": d["cold_s"] / base["cold_s"], "device": d["device_s"] / base["device_s"],
                   **{f"decode_b{b}": d["decode_ms"][b] / base["decode_ms"][b] for b in batches}}
    out["bit_identical"] = d["warm_logits_max_abs"] == 0.0  # checked by the gate, recorded
    return out


# ---------------------------------------------------------------------------- correctness
def correctness_section(args: argparse.Namespace) -> dict[str, Any]:
    from bench.gpu_checks import check_model

    return check_model(args.check_model, args.no_peer, 8 if args.quick else 32)


# ---------------------------------------------------------------------------- disagg, kernels
def disagg_section(args: argparse.Namespace) -> dict[str, Any]:
    from bench.handoff import HANDOFF_TOKENS
    from bench.service import local_service, server_target
    from bench.ttft_server import run_handoff_only, run_server

    length = args.disagg_length
    sizes = EngineSizes(pool_tokens=2 * (length + 256), host_tokens=2 * length + 256,
                        disk_tokens=2 * length + 512, max_model_len=length + HANDOFF_TOKENS,
                        max_batched_tokens=args.max_batched_tokens)
    local = ttft_bench.run_inprocess(_ns(args), [length], args.repeats, sizes=sizes,
                                     clear=True)["summary"][0]
    _free()
    ns = _ns(args, start_service=True)
    # bf16 on random weights: a warm run's token may flip on a near-tie; the service returns no
    # logits, so its tokens are compared only in float32 (the in-process gate covers bf16)
    strict = args.dtype == "float32" or (args.quick and not torch.cuda.is_available())
    with server_target(ns, sizes) as target:
        served = run_server(ns, target, [length], args.repeats, strict_tokens=strict)
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
            "tokens_same": all(s["output_token_ids"] == _cold_tokens(served, s)
                               for s in served["samples"])}


def _cold_tokens(served: dict[str, Any], sample: dict[str, Any]) -> list[int]:
    return next(s["output_token_ids"] for s in served["samples"] if s["mode"] == "cold"
                and s["length"] == sample["length"] and s["repeat"] == sample["repeat"])


def kernels_section(args: argparse.Namespace) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"skipped": "needs CUDA (the kernels' CPU checks are the tests under "
                           "TRITON_INTERPRET=1)", "machine": machine_info()}
    from bench import kernels_gpu

    return kernels_gpu.run(quick=True)


RUNNERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "correctness": correctness_section, "ttft": ttft_section, "ttft-long": ttft_long_section,
    "decode": decode_section, "determinism": determinism_section, "disagg": disagg_section,
    "kernels": kernels_section, "offload": offload_section,
}
