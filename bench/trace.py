"""Trace replay (Mooncake format) at the trace's timestamps: TTFT, TBT, hit rate per tier.

    python -m bench.trace --trace bench/data/mooncake_synthetic_trace.jsonl \
        --length-scale 16 --time-scale 1 --max-requests 1000 [--baseline] [--server HOST:PORT]

``--length-scale`` divides input lengths (each hash_id becomes a block of 512/scale tokens, equal
ids -> equal tokens); ``--time-scale`` multiplies the gaps between requests. In-process the
requests go to an ``EngineLoop`` over a tiered store whose capacities are set with
``--pool-tokens/--host-tokens/--disk-tokens``; ``--baseline`` keeps the device pool only. The
unbounded hit rate is what a cache with no capacity limit would serve, from the hash_ids alone.
``--disk-write-policy`` picks when blocks go to disk; ``--policies a,b,...`` replays once per
policy in the same run and compares hit rate, TTFT and the bytes written to disk side by side.

``--with-baseline`` replays the trace with the tiers and without (``--baseline``) in one run. The
machine's speed drifts by 10-20% within the half minute of a replay, and a fixed order would hand
that drift to one side, so by default (``--order abba``) it replays four times: tiered,
device-only, device-only, tiered. The gain (baseline / tiered TTFT: mean, p50, p90, p99) is over
the requests of both replays of each side pooled, and each adjacent pair's gain is beside it
(``offload_gain.pairs``); ``--order ab`` replays each once, tiered first; ``--cycles N`` repeats
the order N times, abba cycles alternating with baab (a replay right after one of the other side
ran ~20% slower than one after its own side on this machine; with an even number of cycles each
side has as many of those). The top of the JSON is the first tiered replay, ``baseline`` the first
device-only one, ``replays`` the summary of each, in order.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from bench.common import (
    EngineSizes,
    add_run_flags,
    build_engine,
    builtin_vocab,
    format_table,
    machine_info,
    new_parser,
    progress,
    pyplot,
    report,
    run_salt,
    summarize,
)
from bench.driver import TimedRequest, client_sender, engine_sender, hit_rates, run_requests
from bench.service import server_target
from bench.trace_data import block_tokens, load_trace, prompt_tokens, unbounded_hits
from kvstore.config import StoreConfig
from kvstore.write_policy import POLICIES

DEFAULT_TRACE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                             "mooncake_synthetic_trace.jsonl")


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("bench.trace", __doc__)
    p.add_argument("--trace", default=DEFAULT_TRACE)
    p.add_argument("--time-scale", type=float, default=None, help="x trace gaps (default 1)")
    p.add_argument("--length-scale", type=float, default=None, help="/ input lengths (32)")
    p.add_argument("--max-requests", type=int, default=None, help="default 1000")
    p.add_argument("--max-seconds", type=float, default=None, help="stop submitting after")
    p.add_argument("--max-output", type=int, default=None, help="cap output tokens (default 16)")
    p.add_argument("--pool-tokens", type=int, default=None, help="device pool (default 8192)")
    p.add_argument("--host-tokens", type=int, default=None, help="host slab (default 4x pool)")
    p.add_argument("--disk-tokens", type=int, default=None, help="LMDB (default 64x pool)")
    p.add_argument("--baseline", action="store_true", help="device pool only (no host, disk)")
    p.add_argument("--with-baseline", action="store_true",
                   help="replay with the tiers and without (--baseline) in one run, in "
                        "--order, and report the gain of offloading side by side")
    p.add_argument("--order", choices=("abba", "ab"), default="abba",
                   help="with --with-baseline: abba (default) replays tiered, device-only, "
                        "device-only, tiered and pools each side's requests; ab: once each")
    p.add_argument("--cycles", type=int, default=1,
                   help="with --with-baseline: repeat the order this many times (default 1)")
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    p.add_argument("--disk-write-policy", default=None,
                   help=f"when blocks go to disk: {', '.join(POLICIES)} (default evict)")
    p.add_argument("--policies", default=None,
                   help="comma-separated policies to replay one after another in this run")
    add_run_flags(p, "a small replay, about a minute")
    return p


def _defaults(args: argparse.Namespace) -> None:
    quick = args.quick
    for name, full, small in (("time_scale", 1.0, 1.0), ("length_scale", 32.0, 64.0),
                              ("max_requests", 1000, 50), ("max_output", 16, 4),
                              ("pool_tokens", 8192, 2048)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    if args.host_tokens is None:
        args.host_tokens = 0 if args.baseline else 4 * args.pool_tokens
    if args.disk_tokens is None:
        args.disk_tokens = 0 if args.baseline else 64 * args.pool_tokens
    if args.baseline:
        args.host_tokens = args.disk_tokens = 0
    if args.time_scale <= 0 or args.max_requests <= 0 or args.pool_tokens <= 0:
        raise ValueError("--time-scale, --max-requests and --pool-tokens must be positive")
    args.disk_write_policy = args.disk_write_policy or StoreConfig().disk_write_policy
    args.policy_list = None
    if args.policies:
        args.policy_list = [x.strip() for x in args.policies.split(",") if x.strip()]
        if args.server or args.start_service or args.baseline:
            raise ValueError("--policies replays in-process, with the tiers on")
    for policy in args.policy_list or [args.disk_write_policy]:
        if policy not in POLICIES:
            raise ValueError(f"unknown disk write policy {policy!r}; one of {', '.join(POLICIES)}")
    if args.disk_write_policy != StoreConfig().disk_write_policy and args.start_service:
        raise ValueError("--disk-write-policy applies in-process (the service keeps its own)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _defaults(args)
        if args.with_baseline and args.baseline:
            raise ValueError("give --baseline or --with-baseline, not both")
        if args.order != "abba" or args.cycles != 1:
            if not args.with_baseline or args.policy_list:
                raise ValueError("--order and --cycles go with --with-baseline, without --policies")
            if args.cycles < 1:
                raise ValueError("--cycles must be at least 1")
        if args.policy_list:
            runs = {}
            for policy in args.policy_list:
                runs[policy] = run(argparse.Namespace(**{**vars(args),
                                                         "disk_write_policy": policy}))
            result = {**runs[args.policy_list[0]], "policies": runs,
                      "policy_table": policy_table(runs)}
            if args.with_baseline:  # the first policy's replay against one device-only replay
                result["baseline"] = run(baseline_args(args))
                result["offload_gain"] = offload_gain(result, result["baseline"])
        elif args.with_baseline:
            result = with_baseline(args)
        else:
            result = run(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(args.out, "trace", result, render_table, plot)
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    max_len = args.pool_tokens - args.max_output - 16  # a request must fit the pool
    reqs = load_trace(args.trace, args.max_requests, args.length_scale, max_len, args.max_output)
    t_first = reqs[0].timestamp_ms
    bar = progress(len(reqs), "trace", args.no_progress)

    def timed(vocab: int) -> list[TimedRequest]:
        return [
            TimedRequest(f"trace-{i}", (r.timestamp_ms - t_first) / 1e3 * args.time_scale,
                         prompt_tokens(r, i, args.length_scale, vocab, args.seed), r.output_length)
            for i, r in enumerate(reqs)
        ]

    store_cfg: dict[str, Any] = {}
    sizes = EngineSizes(args.pool_tokens, args.host_tokens, args.disk_tokens,
                        args.pool_tokens, args.max_batched_tokens)
    args.mode = "in-process"
    if args.server or args.start_service:
        from router.client import StrataClient

        args.mode = "started service" if args.start_service else "server"
        with server_target(args, sizes) as target, \
                StrataClient(target.address, token=args.token) as client:
            vocab = args.vocab_size or builtin_vocab(args.model)
            records, wall = run_requests(timed(vocab), client_sender(client, run_salt()),
                                         max_seconds=args.max_seconds,
                                         on_done=lambda _: bar.update())
    else:
        from engine.loop import EngineLoop

        with tempfile.TemporaryDirectory(prefix="strata-bench-trace-") as disk_dir:
            engine = build_engine(args.model, args.dtype, sizes, disk_dir, store_kw={
                "disk_write_policy": args.disk_write_policy, "persist_on_close": False})
            try:
                vocab = engine.model_config.vocab_size
                todo = timed(vocab)
                loop = EngineLoop(engine, name="bench-trace")
                try:
                    records, wall = run_requests(todo, engine_sender(loop),
                                                 max_seconds=args.max_seconds,
                                                 on_done=lambda _: bar.update())
                finally:
                    loop.close()
                store_cfg = {"pool_blocks": engine.num_blocks,
                             "block_nbytes": engine.layout.block_nbytes,
                             "store": engine.stats()}
            finally:
                engine.close()
    bar.close()
    return _result(args, reqs, records, wall, store_cfg)


def _result(args: argparse.Namespace, reqs: list[Any], records: list[Any], wall: float,
            engine_info: dict[str, Any]) -> dict[str, Any]:
    done = [r for r in records if r.error is None]
    ub = unbounded_hits(reqs[: len(records)], args.length_scale)
    ub_by_id = {f"trace-{i}": n for i, n in enumerate(ub)}
    prompt_total = sum(r.prompt_len for r in done)
    unbounded = sum(ub_by_id[r.req_id] for r in done) / prompt_total if prompt_total else 0.0
    out_tokens = sum(r.num_output_tokens for r in done)
    return {
        "benchmark": "trace", "machine": machine_info(),
        "config": {
            "mode": args.mode, "trace": args.trace,
            "model": args.model, "time_scale": args.time_scale, "length_scale": args.length_scale,
            "block_tokens": block_tokens(args.length_scale), "max_requests": args.max_requests,
            "max_seconds": args.max_seconds, "max_output": args.max_output,
            "pool_tokens": args.pool_tokens, "host_tokens": args.host_tokens,
            "disk_tokens": args.disk_tokens, "baseline": args.baseline, "seed": args.seed,
            "disk_write_policy": None if args.baseline else args.disk_write_policy,
            **engine_info,
        },
        "num_requests": len(records), "num_finished": len(done),
        "num_errors": len(records) - len(done),
        "errors": sorted({r.error for r in records if r.error})[:10],
        "wall_s": wall,
        "ttft_s": summarize([r.ttft_s for r in done if r.ttft_s is not None]),
        "tbt_s": summarize([g for r in done for g in r.tbt_s]),
        "throughput": {"requests_per_s": len(done) / wall, "output_tokens_per_s": out_tokens / wall,
                       "prompt_tokens_per_s": prompt_total / wall},
        "hit_rate": hit_rates(records),
        "unbounded_hit_rate": unbounded,
        "prompt_tokens": prompt_total, "output_tokens": out_tokens,
        "requests": [
            {"req_id": r.req_id, "submit_s": r.submit_s, "prompt_len": r.prompt_len,
             "ttft_s": r.ttft_s, "tbt_s": r.tbt_s, "num_cached_tokens": r.num_cached_tokens,
             "cached_by_tier": r.cached_by_tier, "unbounded_hit_tokens": ub_by_id[r.req_id],
             "error": r.error}
            for r in records
        ],
    }


def with_baseline(args: argparse.Namespace) -> dict[str, Any]:
    """The replay with the tiers and without, in ``args.order``; the first tiered replay's
    result with ``baseline`` (the first device-only one), ``replays`` and ``offload_gain``."""
    base_args = baseline_args(args)
    # abba cycles alternate with baab: a replay that follows one of the other side, and the
    # first, ran ~20% slower here than one that follows its own side; tiered, device-only,
    # device-only, tiered puts both of tiered's there, tiered, device-only, device-only,
    # tiered, device-only, tiered, tiered, device-only puts three of four of each side there
    cycle = ("TBBT", "BTTB") if args.order == "abba" else ("TB",)
    order = "".join(cycle[i % len(cycle)] for i in range(args.cycles))
    runs = [run(args if side == "T" else base_args) for side in order]
    tiered = [r for side, r in zip(order, runs) if side == "T"]
    base = [r for side, r in zip(order, runs) if side == "B"]
    result = {**tiered[0], "baseline": base[0]}
    result["replays"] = [
        {"side": "tiered" if side == "T" else "baseline", "wall_s": r["wall_s"],
         "num_finished": r["num_finished"], "ttft_s": r["ttft_s"], "hit_rate": r["hit_rate"],
         "throughput": r["throughput"]}
        for side, r in zip(order, runs)
    ]
    gain = offload_gain(pooled(tiered), pooled(base))
    gain["order"], gain["cycles"] = args.order, args.cycles
    if len(order) > 2:  # each (tiered, device-only) pair, side by side in time
        pairs = [(runs[i], runs[i + 1]) if order[i] == "T" else (runs[i + 1], runs[i])
                 for i in range(0, len(order), 2)]
        gain["pairs"] = [offload_gain(t, b) for t, b in pairs]
    result["offload_gain"] = gain
    return result


def baseline_args(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "baseline": True, "host_tokens": 0,
                                 "disk_tokens": 0})


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The replays of one side as one: TTFT over all their finished requests, the hit rate
    weighted by prompt tokens, prompt tokens per second over their summed wall time."""
    prompt = sum(r["prompt_tokens"] for r in runs)
    return {
        "ttft_s": summarize([q["ttft_s"] for r in runs for q in r["requests"]
                             if q["error"] is None and q["ttft_s"] is not None]),
        "hit_rate": {"total": sum(r["hit_rate"]["total"] * r["prompt_tokens"] for r in runs)
                     / prompt if prompt else 0.0},
        "throughput": {"prompt_tokens_per_s": prompt / sum(r["wall_s"] for r in runs)},
    }


def offload_gain(tiered: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The same replay with and without the tiers below the pool: baseline / tiered TTFT (above
    1: offloading is faster), hit rates and throughput of both."""
    out: dict[str, Any] = {}
    for k in ("mean", "p50", "p90", "p99"):
        if k in tiered["ttft_s"] and k in base["ttft_s"]:
            out[f"ttft_{k}_speedup"] = base["ttft_s"][k] / tiered["ttft_s"][k]
    out["hit_rate"] = {"tiered": tiered["hit_rate"]["total"], "baseline": base["hit_rate"]["total"]}
    out["prompt_tokens_per_s"] = {"tiered": tiered["throughput"]["prompt_tokens_per_s"],
                                  "baseline": base["throughput"]["prompt_tokens_per_s"]}
    return out


def policy_table(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per disk write policy: hit rates, TTFT percentiles, bytes written to disk."""
    rows = []
    for policy, r in runs.items():
        store = r["config"].get("store", {})
        rows.append({
            "policy": policy, "hit_rate": r["hit_rate"],
            "ttft_s": {k: r["ttft_s"].get(k) for k in ("p50", "p90", "p99")},
            "disk_written_bytes": store.get("store_disk_written_bytes", 0),
            "disk_written_blocks": store.get("store_disk_written_blocks", 0),
            "disk_refused_writes": store.get("store_disk_refused_writes", 0),
            "host_evictions": store.get("store_host_evictions", 0),
            "requests_per_s": r["throughput"]["requests_per_s"],
        })
    return rows


def render_policies(result: dict[str, Any]) -> str:
    rows = [[r["policy"], r["hit_rate"]["total"], r["hit_rate"]["host"], r["hit_rate"]["disk"]]
            + [r["ttft_s"][k] * 1e3 if r["ttft_s"][k] is not None else None
               for k in ("p50", "p90", "p99")]
            + [r["disk_written_bytes"] / 2**20, r["disk_refused_writes"], r["requests_per_s"]]
            for r in result["policy_table"]]
    return ("disk write policies, same trace, one after another in this run\n" + format_table(
        ["policy", "hit", "host", "disk", "TTFT p50 ms", "p90", "p99", "disk MiB written",
         "refused", "req/s"], rows))


def render_table(result: dict[str, Any]) -> str:
    if "policies" in result:
        inner = {k: v for k, v in result.items() if k not in ("policies", "policy_table")}
        parts = [render_table(r) for r in result["policies"].values()]
        if "baseline" in inner:
            parts.append(render_table(inner["baseline"]))
        return "\n\n".join(parts + [render_policies(result)])
    if "baseline" in result:
        g = result["offload_gain"]
        inner = {k: v for k, v in result.items() if k not in ("baseline", "offload_gain")}
        inner.pop("replays", None)

        def speedups(gain: dict[str, Any]) -> str:
            return ", ".join(f"{k.split('_')[1]} x{v:.2f}" for k, v in gain.items()
                             if k.endswith("_speedup"))

        parts = [render_table(inner), render_table(result["baseline"])]
        replays = result.get("replays", [])
        if len(replays) > 2:
            parts.append("replays in order\n" + format_table(
                ["#", "replay", "TTFT mean ms", "p50", "p90", "p99", "req/s", "hit"],
                [[i + 1, r["side"]] + [r["ttft_s"][k] * 1e3 if k in r["ttft_s"] else None
                                       for k in ("mean", "p50", "p90", "p99")]
                 + [r["throughput"]["requests_per_s"], r["hit_rate"]["total"]]
                 for i, r in enumerate(replays)]))
        pooled_note = (" (the replays of each side pooled)" if len(replays) > 2 else "")
        text = (f"offloading against the device pool alone, same run{pooled_note}: TTFT "
                f"{speedups(g)} (baseline / tiered); hit rate {g['hit_rate']['tiered']:.3f} vs "
                f"{g['hit_rate']['baseline']:.3f}")
        for i, pair in enumerate(g.get("pairs", [])):
            text += f"\n  replays {2 * i + 1} and {2 * i + 2}: TTFT {speedups(pair)}"
        if len(g.get("pairs", [])) > 1:
            means = sorted(p["ttft_mean_speedup"] for p in g["pairs"])
            text += (f"\n  tiered ahead on the mean in {sum(m > 1 for m in means)} of "
                     f"{len(means)} pairs")
        return "\n\n".join(parts + [text])
    cfg = result["config"]
    rows = []
    for name in ("ttft_s", "tbt_s"):
        s = result[name]
        rows.append([name[:-2].upper() + " ms", s.get("count", 0)] + [
            s[k] * 1e3 if k in s else None for k in ("mean", "p50", "p90", "p99")])
    hr, tp = result["hit_rate"], result["throughput"]
    lines = [
        f"trace replay, {cfg['model']} ({cfg['mode']}{', baseline' if cfg['baseline'] else ''}): "
        f"{result['num_finished']}/{result['num_requests']} requests in {result['wall_s']:.1f} s, "
        f"time x{cfg['time_scale']:g}, lengths /{cfg['length_scale']:g}",
        format_table(["", "n", "mean", "p50", "p90", "p99"], rows),
        f"throughput: {tp['requests_per_s']:.2f} req/s, {tp['output_tokens_per_s']:.1f} output "
        f"tok/s, {tp['prompt_tokens_per_s']:.0f} prompt tok/s",
        "hit rate: " + ", ".join(f"{k} {hr[k]:.3f}" for k in ("total", "device", "host", "disk"))
        + f"; unbounded cache {result['unbounded_hit_rate']:.3f}",
    ]
    if result["num_errors"]:
        lines.append(f"errors ({result['num_errors']}): {result['errors']}")
    return "\n".join(lines)


def plot_policies(result: dict[str, Any], path: str) -> None:
    plt = pyplot()
    rows = result["policy_table"]
    names = [r["policy"] for r in rows]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4))
    for j, k in enumerate(("p50", "p90", "p99")):
        xs = [i + (j - 1) * 0.27 for i in range(len(rows))]
        ax1.bar(xs, [r["ttft_s"][k] or 0 for r in rows], width=0.27, label=k, color=f"C{j}")
    if "baseline" in result:
        base = result["baseline"]["ttft_s"]
        for j, k in enumerate(("p50", "p90", "p99")):
            ax1.axhline(base.get(k, 0), color=f"C{j}", ls=":", lw=1)
    ax1.set_xticks(range(len(rows)), names, rotation=15, fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("TTFT (s)  [dotted: pool only]")
    ax1.legend(fontsize=8)
    bottom = [0.0] * len(rows)
    for j, tier in enumerate(("device", "host", "disk")):
        vals = [r["hit_rate"][tier] for r in rows]
        ax2.bar(names, vals, bottom=bottom, label=tier, color=f"C{j}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.axhline(result["unbounded_hit_rate"], color="0.4", ls="--", lw=1, label="unbounded")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("prompt-token hit rate")
    ax2.tick_params(axis="x", labelrotation=15, labelsize=8)
    ax2.legend(fontsize=8)
    ax3.bar(names, [r["disk_written_bytes"] / 2**20 for r in rows], color="C4")
    ax3.set_ylabel("MiB written to disk")
    ax3.tick_params(axis="x", labelrotation=15, labelsize=8)
    fig.suptitle(f"disk write policies, trace replay, {result['config']['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(result: dict[str, Any], path: str) -> None:
    if "policy_table" in result:
        plot_policies(result, path)
        return
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    reqs = [r for r in result["requests"] if r["ttft_s"] is not None]
    ax1.scatter([r["submit_s"] for r in reqs], [r["ttft_s"] for r in reqs], s=8,
                c=[r["num_cached_tokens"] / r["prompt_len"] for r in reqs], cmap="viridis")
    if "baseline" in result:
        base = [r for r in result["baseline"]["requests"] if r["ttft_s"] is not None]
        ax1.scatter([r["submit_s"] for r in base], [r["ttft_s"] for r in base], s=8, marker="x",
                    c="0.6", label="baseline (device pool only)")
        ax1.legend(fontsize=8)
    ax1.set_yscale("log")
    ax1.set_xlabel("submit time (s)")
    ax1.set_ylabel("TTFT (s)  [colour: cached fraction]")
    ax1.grid(True, alpha=0.3)
    hr = result["hit_rate"]
    names = ["device", "host", "disk", "total", "unbounded"]
    vals = [hr["device"], hr["host"], hr["disk"], hr["total"], result["unbounded_hit_rate"]]
    colors = ["C0", "C1", "C2", "C3", "C7"]
    if "baseline" in result:
        names.append("baseline")
        vals.append(result["baseline"]["hit_rate"]["total"])
        colors.append("0.6")
    ax2.bar(names, vals, color=colors)
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("prompt-token hit rate")
    fig.suptitle(f"trace replay, {result['config']['model']} ({result['config']['mode']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
