"""``bench.ttft --server HOST:PORT``: the same prompts through a running service, cold then warm.

TTFT is measured client side (send -> first streamed token); the tiers of a remote service
cannot be evicted from outside, so only cold and warm are timed, and the usage's
``cached_tokens_by_tier`` says which tier served each warm run. Each run uses its own cache
salt, so nothing cached by an earlier run is hit.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from bench.common import builtin_vocab, machine_info, progress, random_prompt, run_salt
from bench.ttft import BenchmarkError


def run_server(args: argparse.Namespace, lengths: list[int], repeats: int) -> dict[str, Any]:
    from router.client import StrataClient

    vocab = args.vocab_size or builtin_vocab(args.model)
    samples: list[dict[str, Any]] = []
    bar = progress(repeats * len(lengths) * 2, "ttft (server)", args.no_progress)
    salt = run_salt()  # this run's prompts never hit blocks of an earlier run
    with StrataClient(args.server, token=args.token) as client:
        for rep in range(repeats):
            for length in lengths:
                prompt = random_prompt(args.seed * 1_000_003 + rep * 7919 + length, length, vocab)
                cold = None
                for mode in ("cold", "warm"):
                    res = client.generate(prompt_token_ids=prompt, max_tokens=1, temperature=0.0,
                                          cache_salt=salt)
                    by_tier = dict(res.usage.cached_tokens_by_tier)
                    if mode == "cold":
                        cold = res
                        if res.usage.cached_tokens:
                            raise BenchmarkError(f"cold run found {by_tier} cached")
                    else:
                        assert cold is not None
                        if not res.usage.cached_tokens:
                            raise BenchmarkError(
                                f"warm run of {length} tokens found nothing cached")
                        if res.token_ids != cold.token_ids:
                            raise BenchmarkError(f"warm output {res.token_ids} != {cold.token_ids}")
                    samples.append({
                        "length": length, "repeat": rep, "mode": mode,
                        "ttft_s": res.ttft_ms_client / 1e3,
                        "ttft_server_s": res.ttft_ms_server / 1e3,
                        "num_cached_tokens": res.usage.cached_tokens, "cached_by_tier": by_tier,
                        "output_token_ids": res.token_ids,
                    })
                    bar.update(1)
    bar.close()
    summary = []
    for length in lengths:
        row: dict[str, Any] = {"length": length}
        for mode in ("cold", "warm"):
            xs = [s for s in samples if s["length"] == length and s["mode"] == mode]
            row[f"{mode}_s"] = statistics.median(s["ttft_s"] for s in xs)
        row["warm_over_cold"] = row["warm_s"] / row["cold_s"]
        row["warm_tiers"] = next(
            s["cached_by_tier"] for s in samples if s["length"] == length and s["mode"] == "warm")
        summary.append(row)
    return {
        "benchmark": "ttft", "machine": machine_info(),
        "config": {"mode": "server", "server": args.server, "model": args.model,
                   "lengths": lengths, "repeats": repeats, "seed": args.seed},
        "bandwidth_gbps": {}, "samples": samples, "summary": summary,
    }
