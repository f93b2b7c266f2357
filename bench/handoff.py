"""The prefill -> decode handoff as a client sees it: the gap between the first and the second
streamed token, against the time per token after it.

For each length, fresh prompts (cold everywhere) are streamed with ``HANDOFF_TOKENS`` tokens,
greedy, and every token's arrival is recorded client side. Per prompt:

- TTFT: request sent -> first token (the prefill worker's);
- gap 1->2: first -> second token (the decode worker's first; it waits for the last pushed
  blocks, then computes the prompt's partial last block and the first token's KV);
- per-token: the median gap between the later tokens (steady decoding);
- exposed handoff = gap 1->2 - per-token: what the handoff adds to one decode step, also given
  in decode steps (exposed / per-token).

Colocated (one worker does both, no transfer) the same prompts give the baseline: its gap 1->2
is one decode step and nothing is exposed.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.common import random_prompt

HANDOFF_TOKENS = 10  # tokens per stream: first, second, then 8 for the steady per-token time


def measure(client: Any, lengths: list[int], repeats: int, vocab: int, salt: str,
            seed: int, bar: Any) -> list[dict[str, Any]]:
    """One sample per (length, repeat): arrival times and the figures above."""
    samples = []
    for rep in range(repeats):
        for length in lengths:
            # a seed space of its own: never a prompt the TTFT cycles already cached
            prompt = random_prompt((seed + 1) * 7_000_003 + rep * 104_729 + length + 55_555,
                                   length, vocab)
            arrivals: list[float] = []
            t0 = time.perf_counter()
            final = None
            for chunk in client.stream(prompt_token_ids=prompt, max_tokens=HANDOFF_TOKENS,
                                       temperature=0.0, ignore_eos=True, cache_salt=salt,
                                       timeout=1800.0):
                now = time.perf_counter()
                arrivals.extend([now] * len(chunk.token_ids))
                if chunk.finish_reason:
                    final = chunk
            if len(arrivals) != HANDOFF_TOKENS or final is None:
                raise RuntimeError(f"handoff stream of {length} tokens gave {len(arrivals)} tokens")
            gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
            per_token = statistics.median(gaps[1:])
            samples.append({
                "length": length, "repeat": rep, "ttft_s": arrivals[0] - t0,
                "gap12_s": gaps[0], "per_token_s": per_token,
                "exposed_s": gaps[0] - per_token, "gaps_s": gaps,
                "cached_tokens": final.usage.cached_tokens,
                "prefill_worker": final.usage.prefill_worker,
                "decode_worker": final.usage.decode_worker,
            })
            bar.update(1)
    return samples


def summarize(samples: list[dict[str, Any]], lengths: list[int]) -> list[dict[str, Any]]:
    rows = []
    for length in lengths:
        xs = [s for s in samples if s["length"] == length]
        row: dict[str, Any] = {"length": length}
        for key in ("ttft_s", "gap12_s", "per_token_s", "exposed_s"):
            row[key] = statistics.median(s[key] for s in xs)
        # tokens that arrive in one message (a loaded machine) leave no gap to divide by
        per = row["per_token_s"]
        row["exposed_steps"] = row["exposed_s"] / per if per > 0 else None
        rows.append(row)
    return rows


def render(title: str, rows: list[dict[str, Any]]) -> tuple[str, list[str], list[list[object]]]:
    headers = ["tokens", "TTFT ms", "gap 1->2 ms", "per-token ms", "exposed ms", "in steps"]
    table = [[r["length"], r["ttft_s"] * 1e3, r["gap12_s"] * 1e3, r["per_token_s"] * 1e3,
              r["exposed_s"] * 1e3, r["exposed_steps"]] for r in rows]
    return title, headers, table
