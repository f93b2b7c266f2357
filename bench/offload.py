"""Prefill with the offload running against prefill without it, side by side in one run.

    python -m bench.offload --model tiny --lengths 4096,16384 [--repeats 3]

Two engines share the weights: one over a host tier (a slab that holds the longest prompt; no
disk), where every new full block is copied pool -> slab on the offload lane while the next
prefill chunk computes, and one with no store, where nothing is copied. For each length and
repeat a fresh prompt is prefilled by both (one token generated), alternating which goes first;
the figure is TTFT. Between runs the copies still under way are finished and the prompt's blocks
dropped (not timed), so no run pays for an earlier one's copies.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from bench.common import (
    EngineSizes,
    add_run_flags,
    build_engine,
    format_table,
    machine_info,
    new_parser,
    parse_ints,
    progress,
    pyplot,
    random_prompt,
    report,
)

DEFAULT_LENGTHS = "4096,16384"
QUICK_LENGTHS = "1024"


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("bench.offload", __doc__)
    p.add_argument("--lengths", default=None, help=f"prompt lengths (default {DEFAULT_LENGTHS})")
    p.add_argument("--repeats", type=int, default=None, help="runs per length (default 3)")
    p.add_argument("--max-batched-tokens", type=int, default=2048, help="prefill chunk size")
    add_run_flags(p, f"lengths {QUICK_LENGTHS}, 2 repeats")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.server or args.start_service:
            raise ValueError("bench offload runs in-process only")
        lengths = parse_ints(args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS),
                             "--lengths")
        repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
        if repeats < 1:
            raise ValueError("--repeats must be at least 1")
        from bench.service import check_lengths

        check_lengths(args.model, lengths)
        result = run(args, lengths, repeats)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(args.out, "offload", result, render_table, plot)
    return 0


def run(args: argparse.Namespace, lengths: list[int], repeats: int,
        loaded: Any = None) -> dict[str, Any]:
    from engine.loader import load_model
    from engine.sampling import SamplingParams

    loaded = loaded or load_model(args.model, args.dtype, "auto", 0)
    longest = max(lengths)
    sizes = EngineSizes(pool_tokens=longest + 64, host_tokens=longest + 64, disk_tokens=0,
                        max_model_len=longest + 2, max_batched_tokens=args.max_batched_tokens)
    bare = EngineSizes(sizes.pool_tokens, 0, 0, sizes.max_model_len, sizes.max_batched_tokens)
    engines = {"offload": build_engine(args.model, args.dtype, sizes, None, loaded=loaded),
               "no_store": build_engine(args.model, args.dtype, bare, None, loaded=loaded)}
    sampling = SamplingParams(max_tokens=1)
    samples: list[dict[str, Any]] = []
    try:
        assert engines["offload"].store is not None and engines["no_store"].store is None
        vocab = loaded.config.vocab_size
        bar = progress(2 * (repeats * len(lengths) + 1), "offload", args.no_progress)
        for i, length in enumerate([min(lengths)] + [n for _ in range(repeats) for n in lengths]):
            prompt = random_prompt(args.seed * 7919 + i, length, vocab)
            order = ["offload", "no_store"] if i % 2 else ["no_store", "offload"]
            for name in order:
                eng = engines[name]
                before = eng.kv.copier.num_offloaded if eng.kv.copier is not None else 0
                res = eng.generate([prompt], sampling)[0]
                stats = _drop(eng, prompt, before)
                if i > 0:  # the first prompt is the warm-up
                    samples.append({"length": length, "prompt": i, "engine": name,
                                    "ttft_s": res.ttft_s,
                                    "num_cached_tokens": res.num_cached_tokens,
                                    "output_token_ids": res.output_token_ids, **stats})
                bar.update(1)
        bar.close()
    finally:
        for eng in engines.values():
            eng.close()
    rows = []
    for length in lengths:
        row: dict[str, Any] = {"length": length}
        for name in engines:
            xs = [s["ttft_s"] for s in samples if s["length"] == length and s["engine"] == name]
            row[f"{name}_s"] = statistics.median(xs)
        row["overhead"] = row["offload_s"] / row["no_store_s"] - 1.0
        row["offloaded_blocks"] = max(s.get("offloaded_blocks", 0) for s in samples
                                      if s["length"] == length)
        rows.append(row)
    return {
        "benchmark": "offload", "machine": machine_info(),
        "config": {"model": args.model, "dtype": str(loaded.dtype), "device": str(loaded.device),
                   "lengths": lengths, "repeats": repeats,
                   "max_batched_tokens": args.max_batched_tokens, "seed": args.seed},
        "samples": samples, "rows": rows,
    }


def _drop(eng: Any, prompt: list[int], before: int) -> dict[str, int]:
    """Finish the copies under way and forget the prompt in every tier (not timed); the blocks
    offloaded since ``before`` (the copier's count when the run started)."""
    if eng.store is None:
        eng.kv.evict_all_free()
        return {}
    eng.kv.finish_copies()
    num = eng.kv.copier.num_offloaded - before
    eng.kv.evict_all_free()  # the store holds them all: nothing to demote
    eng.store.remove(eng.block_hashes(prompt))
    return {"offloaded_blocks": num}


def render_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    rows = [[r["length"], r["no_store_s"] * 1e3, r["offload_s"] * 1e3, f"{r['overhead']:+.1%}",
             r["offloaded_blocks"]] for r in result["rows"]]
    return (f"prefill TTFT with the offload running vs without, {cfg['model']} {cfg['dtype']} "
            f"on {cfg['device']}, medians of {cfg['repeats']}\n"
            + format_table(["tokens", "no store ms", "offload ms", "overhead", "blocks"], rows))


def plot(result: dict[str, Any], path: str) -> None:
    plt = pyplot()
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["no_store_s"] for r in rows], width=0.4, label="no store")
    ax.bar([x + 0.2 for x in xs], [r["offload_s"] for r in rows], width=0.4,
           label="offload running")
    ax.set_xticks(list(xs), [str(r["length"]) for r in rows])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (s)")
    ax.set_title(f"prefill with and without the offload, {result['config']['model']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
