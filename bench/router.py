"""The router at cluster scale: the real index and cost model over simulated workers.

    strata bench router [--workers 8,64,256,1024] [--trace FILE] [--quick]

For each worker count: the Mooncake trace replayed at its timestamps (simulated time, full
length: a hash_id is 512 tokens, 32 blocks of 16) with prefix-aware, load-only and random
placement: predicted TTFT p50/p90/p99 and the cluster-wide hit rate per tier, beside the
hit rate of an unbounded cache. Then, on the index state the prefix-aware replay left: the
events/s, index bytes and ``choose_prefill`` latency of a 32K-token prompt, for the index over
all workers (after) and the per-worker reference (before), in the same run.
Workers: prefill speed, tier bandwidths and capacities from the profile flags (defaults:
Llama-3.1-8B on one H100, BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.common import format_table, machine_info, parse_ints, progress, report, summarize
from bench.router_plot import plot
from bench.router_replay import POLICIES, ReplayResult, Workload, replay
from bench.router_scale import SHARES, scale_point
from bench.router_sim import SimProfile
from bench.trace_data import load_trace

DEFAULT_TRACE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                             "mooncake_synthetic_trace.jsonl")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.router", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--trace", default=DEFAULT_TRACE)
    p.add_argument("--workers", default=None, help="worker counts (default 8,64,256,1024)")
    p.add_argument("--max-requests", type=int, default=None, help="default: the whole trace")
    p.add_argument("--repeats", type=int, default=None, help="event replays per index (3)")
    p.add_argument("--samples", type=int, default=None, help="placements timed per case (50)")
    p.add_argument("--ref-samples", type=int, default=None,
                   help="placements timed per case with the reference index (5)")
    p.add_argument("--no-reference", action="store_true", help="skip the 'before' figures")
    d = SimProfile()
    p.add_argument("--prefill-tokens-per-s", type=float, default=d.prefill_tokens_per_s,
                   help="a worker's prefill speed (default: 8B shape on one H100)")
    p.add_argument("--block-nbytes", type=int, default=d.block_nbytes,
                   help="KV bytes of one 16-token block (default: 8B shape, 2 MiB)")
    p.add_argument("--host-gbps", type=float, default=d.host_bytes_per_s / 1e9,
                   help="host -> HBM load, GB/s")
    p.add_argument("--disk-gbps", type=float, default=d.disk_bytes_per_s / 1e9,
                   help="disk -> HBM load, GB/s")
    p.add_argument("--net-gbps", type=float, default=d.net_bytes_per_s / 1e9,
                   help="worker-to-worker pull, GB/s (0: never pull)")
    p.add_argument("--device-blocks", type=int, default=d.device_blocks,
                   help="blocks of a worker's HBM pool")
    p.add_argument("--host-blocks", type=int, default=d.host_blocks,
                   help="blocks of a worker's host tier (0: off)")
    p.add_argument("--disk-blocks", type=int, default=d.disk_blocks,
                   help="blocks of a worker's disk tier (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for JSON + PNG (bench/results)")
    p.add_argument("--quick", action="store_true",
                   help="8 / 64 / 256 workers, fewer repeats and samples: a few minutes")
    p.add_argument("--no-progress", action="store_true")
    return p


def _defaults(args: argparse.Namespace) -> None:
    quick = args.quick
    if args.workers is None:
        args.workers = "8,64,256" if quick else "8,64,256,1024"
    args.worker_counts = parse_ints(args.workers, "--workers")
    for name, full, small in (("repeats", 3, 1), ("samples", 50, 20), ("ref_samples", 5, 3)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if args.repeats < 1 or args.samples < 1 or args.ref_samples < 1:
        raise ValueError("--repeats, --samples and --ref-samples must be >= 1")
    if args.max_requests is not None and args.max_requests < 1:
        raise ValueError("--max-requests must be >= 1")


def profile_of(args: argparse.Namespace) -> SimProfile:
    return SimProfile(
        block_nbytes=args.block_nbytes, prefill_tokens_per_s=args.prefill_tokens_per_s,
        host_bytes_per_s=args.host_gbps * 1e9, disk_bytes_per_s=args.disk_gbps * 1e9,
        net_bytes_per_s=args.net_gbps * 1e9, device_blocks=args.device_blocks,
        host_blocks=args.host_blocks, disk_blocks=args.disk_blocks,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _defaults(args)
        result = run(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(args.out, "router", result, render_table, plot)
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    profile = profile_of(args)
    t0 = time.perf_counter()
    reqs = load_trace(args.trace, args.max_requests)  # full length: no scaling
    work = Workload.from_trace(reqs, profile.block_size)
    hash_s = time.perf_counter() - t0
    prompt_tokens = sum(work.prompt_lens)
    bar = progress(len(args.worker_counts) * len(POLICIES) * len(reqs), "router",
                   args.no_progress)
    rows = []
    for n in args.worker_counts:
        runs = {pol: replay(work, n, pol, profile, args.seed, record_events=pol == POLICIES[0],
                            on_request=bar.update)
                for pol in POLICIES}
        stream = runs[POLICIES[0]].events
        assert stream is not None
        row = scale_point(stream, n, profile, repeats=args.repeats, samples=args.samples,
                          ref_samples=args.ref_samples, seed=args.seed,
                          with_reference=not args.no_reference)
        rows.append(_row(row, runs, prompt_tokens))
        del runs, stream
    bar.close()
    return {
        "benchmark": "router", "machine": machine_info(),
        "config": {"trace": args.trace, "workers": args.worker_counts,
                   "max_requests": args.max_requests, "repeats": args.repeats,
                   "samples": args.samples, "ref_samples": args.ref_samples,
                   "seed": args.seed, "quick": args.quick,
                   "profile": dataclasses.asdict(profile)},
        "trace": {"requests": len(reqs), "prompt_tokens": prompt_tokens,
                  "unbounded_hit_rate": sum(work.unbounded_blocks) * profile.block_size
                  / prompt_tokens, "hash_s": hash_s},
        "rows": rows,
    }


def _ms(samples: list[float]) -> dict[str, float]:
    return {k: v * 1e3 if k != "count" else v for k, v in summarize(samples).items()}


def _row(point: dict[str, Any], runs: dict[str, ReplayResult], prompt_tokens: int,
         ) -> dict[str, Any]:
    """One JSON row: the headline figures first, then every detail."""
    shares = [t for s in SHARES for t in point["placement"][s]]
    out: dict[str, Any] = {
        "workers": point["workers"],
        "placement_p50_ms": _ms(shares)["p50"], "placement_p99_ms": _ms(shares)["p99"],
        "mixed_p50_ms": _ms(point["placement"]["mixed"])["p50"],
        # the first call after a full collection (cold caches), the worst of the shares
        "placement_first_call_ms": max(point["placement_first_call"][s] for s in SHARES) * 1e3,
        "events_per_s": point["events_per_s"], "index_bytes": point["index_bytes"],
        "index_bytes_per_mblock": point["index_bytes_per_mblock"], "blocks": point["blocks"],
        "events": point["events"],
        "placement_ms": {s: _ms(t) for s, t in point["placement"].items()},
        "trace_placement_ms": _ms(runs[POLICIES[0]].placement_s),
    }
    if "before" in point:
        b = point["before"]
        before_shares = [t for s in SHARES for t in b["placement"][s]]
        out["before"] = {
            "placement_p50_ms": _ms(before_shares)["p50"],
            "placement_p99_ms": _ms(before_shares)["p99"],
            "mixed_p50_ms": _ms(b["placement"]["mixed"])["p50"],
            "events_per_s": b["events_per_s"], "index_bytes": b["index_bytes"],
            "index_bytes_per_mblock": b["index_bytes_per_mblock"],
            "placement_ms": {s: _ms(t) for s, t in b["placement"].items()},
            "remove_worker_ms": b["remove_worker_s"] * 1e3,
        }
        out["remove_worker_ms"] = point["remove_worker_s"] * 1e3
        out["compact_ms"] = point["compact_s"] * 1e3
        out["placements_agree"] = point["placements_agree"]
        out["ttft_over_reference"] = point["ttft_over_reference"]
    out["policies"] = {}
    for pol, r in runs.items():
        served = {k: v / prompt_tokens for k, v in r.served_tokens.items()}
        out["policies"][pol] = {"ttft_s": summarize(r.ttft_s),
                                "hit_rate": {**served, "total": sum(served.values())},
                                "held_rate": r.held_tokens / prompt_tokens,
                                "wall_s": r.wall_s}
    return out


def render_table(result: dict[str, Any]) -> str:
    tr, rows = result["trace"], result["rows"]
    head = ["workers", "place p50 ms", "p99", "1st call", "before p50", "before p99",
            "mixed p50", "before", "events/s", "before", "MB/M blocks", "before", "remove ms",
            "before"]
    table = []
    for r in rows:
        b = r.get("before", {})
        table.append([
            r["workers"], r["placement_p50_ms"], r["placement_p99_ms"],
            r["placement_first_call_ms"], b.get("placement_p50_ms"), b.get("placement_p99_ms"),
            r["mixed_p50_ms"],
            b.get("mixed_p50_ms"), f"{r['events_per_s'] / 1e6:.2f}M",
            f"{b['events_per_s'] / 1e6:.2f}M" if b else None,
            r["index_bytes_per_mblock"] / 2**20,
            b["index_bytes_per_mblock"] / 2**20 if b else None, r.get("remove_worker_ms"),
            b.get("remove_worker_ms"),
        ])
    lines = [
        f"router at scale: {tr['requests']} trace requests ({tr['prompt_tokens']} prompt "
        f"tokens), unbounded-cache hit rate {tr['unbounded_hit_rate']:.3f}",
        "placement: choose_prefill of a 32K-token prompt over every worker, held by none / "
        "one / a quarter / all of them (p50, p99 pooled; 1st call: the slowest first call "
        "after a full garbage collection, apart); mixed = a distinct residency per "
        "worker; before = the per-worker index and unbounded loop; index MB per million "
        "blocks held",
        format_table(head, table),
        "",
        "trace replay, simulated time: predicted TTFT (s) and hit rate by tier",
    ]
    prows = []
    for r in rows:
        for pol, v in r["policies"].items():
            t, h = v["ttft_s"], v["hit_rate"]
            prows.append([r["workers"], pol, t["p50"], t["p90"], t["p99"], h["total"],
                          h["device"], h["host"], h["disk"], h["remote"], v["held_rate"]])
    lines.append(format_table(["workers", "placement", "p50", "p90", "p99", "hit", "device",
                               "host", "disk", "remote", "held"], prows))
    lines.append("hit: prompt tokens loaded from a tier (or pulled: remote), over all prompt "
                 "tokens; held: the chosen worker held them in some tier, loaded or recomputed")
    for r in rows:
        for scenario, gap in r.get("ttft_over_reference", {}).items():
            lines.append(f"{r['workers']} workers, {scenario}: the bounded placement chose "
                         f"another worker than the unbounded reference, predicted TTFT "
                         f"{gap:+.2%}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
