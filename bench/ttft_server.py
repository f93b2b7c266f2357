"""``bench.ttft --server HOST:PORT | --start-service``: TTFT through the service's gRPC API.

TTFT is measured client side (send -> first streamed token). Against a running service
(``--server``) the tiers cannot be emptied from outside, so each prompt is timed cold and then
warm, and the usage's ``cached_tokens_by_tier`` says which tier served the warm run. A service
this run started (``--start-service``) is its own: before the warm-host and warm-disk runs every
worker's free cached blocks are pushed down to that tier (the LMDB pages dropped from the OS
cache), so each tier is timed, and checked, as in-process; the floors of host and disk use the
load speeds the prefill worker measured at start-up. Each request asks for two tokens, so its KV
crosses from the prefill to the decode worker (the second token comes from there); the pushes
of the run are reported. Each run uses its own cache salt, so nothing cached by an earlier run
is hit.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from bench import handoff
from bench.common import (
    BenchmarkError,
    builtin_vocab,
    machine_info,
    progress,
    random_prompt,
    run_salt,
)
from bench.service import Target


def run_server(
    args: argparse.Namespace, target: Target, lengths: list[int], repeats: int,
    strict_tokens: bool = True,
) -> dict[str, Any]:
    """``strict_tokens=False``: a warm run's tokens may differ from the cold run's (bf16 on
    random weights: the service returns no logits to gate on, ``bench.ttft``'s in-process gate
    does); each sample says whether they matched."""
    from router.client import StrataClient

    tiered = target.evict is not None
    modes = ("cold", "device", "host", "disk") if tiered else ("cold", "warm")
    vocab = _check_served_model(args, target, lengths)
    samples: list[dict[str, Any]] = []
    bar = progress(repeats * len(lengths) * (len(modes) + 1), "ttft (server)", args.no_progress)
    salt = run_salt()  # this run's prompts never hit blocks of an earlier run
    with StrataClient(target.address, token=args.token) as client:
        # Warm-up (first-call costs of every path), not recorded.
        _cycle(client, target, random_prompt(-1, min(lengths), vocab), modes, salt,
               strict_tokens)
        for rep in range(repeats):
            for length in lengths:
                prompt = random_prompt(args.seed * 1_000_003 + rep * 7919 + length, length, vocab)
                for mode, res in _cycle(client, target, prompt, modes, salt, strict_tokens):
                    samples.append({
                        "length": length, "repeat": rep, "mode": mode,
                        "ttft_s": res.ttft_ms_client / 1e3,
                        "ttft_server_s": res.ttft_ms_server / 1e3,
                        "num_cached_tokens": res.usage.cached_tokens,
                        "cached_by_tier": dict(res.usage.cached_tokens_by_tier),
                        "output_token_ids": res.token_ids,
                    })
                    bar.update(1)
        handoff_samples = handoff.measure(client, lengths, repeats, vocab, salt, args.seed, bar)
    bar.close()
    transfer = _transfer(target.prefill_stats()) if target.prefill_stats else None
    info = target.worker_info or {}
    tier_gbps = {t: v / 1e9 for t, v in (info.get("tier_bytes_per_s") or {}).items()}
    summary = []
    for length in lengths:
        row: dict[str, Any] = {"length": length}
        for mode in modes:
            xs = [s for s in samples if s["length"] == length and s["mode"] == mode]
            row[f"{mode}_s"] = statistics.median(s["ttft_s"] for s in xs)
        warm = [m for m in modes if m != "cold"]
        for mode in warm:
            row[f"{mode}_over_cold"] = row[f"{mode}_s"] / row["cold_s"]
            row[f"{mode}_tiers"] = next(s["cached_by_tier"] for s in samples
                                        if s["length"] == length and s["mode"] == mode)
            if mode in tier_gbps and info.get("block_nbytes"):
                cached_blocks = (length - 1) // info["block_size"]
                floor = cached_blocks * info["block_nbytes"] / (tier_gbps[mode] * 1e9)
                row[f"{mode}_floor_s"] = floor
                row[f"{mode}_over_floor"] = row[f"{mode}_s"] / floor if floor > 0 else None
        summary.append(row)
    return {
        "benchmark": "ttft", "machine": machine_info(),
        "config": {"mode": "server", "server": target.address, "started_service": tiered,
                   "model": args.model, "lengths": lengths, "repeats": repeats,
                   "modes": list(modes), "seed": args.seed,
                   "block_size": info.get("block_size"), "block_nbytes": info.get("block_nbytes")},
        "bandwidth_gbps": tier_gbps, "samples": samples, "summary": summary,
        "kv_transfer": transfer,
        "handoff": {"tokens": handoff.HANDOFF_TOKENS, "samples": handoff_samples,
                    "summary": handoff.summarize(handoff_samples, lengths)},
    }


def run_handoff_only(args: argparse.Namespace, target: Target, lengths: list[int],
                     repeats: int, name: str) -> dict[str, Any]:
    """Only the handoff streams (TTFT included), e.g. against a colocated service."""
    from router.client import StrataClient

    vocab = _check_served_model(args, target, lengths)
    bar = progress(repeats * len(lengths), f"handoff ({name})", args.no_progress)
    with StrataClient(target.address, token=args.token) as client:
        client.generate(prompt_token_ids=random_prompt(-2, min(lengths), vocab), max_tokens=2)
        samples = handoff.measure(client, lengths, repeats, vocab, run_salt(), args.seed, bar)
    bar.close()
    return {"tokens": handoff.HANDOFF_TOKENS, "samples": samples,
            "summary": handoff.summarize(samples, lengths)}


def _check_served_model(args: argparse.Namespace, target: Target, lengths: list[int]) -> int:
    """Ask the service which model it serves (the ``Health`` RPC) before sending anything:
    every length (+ the 2 generated tokens) must fit its context window. Returns the
    vocabulary to draw prompt ids from: ``--vocab-size`` if given, else the served model's."""
    from router.client import StrataClient

    with StrataClient(target.address, token=args.token) as client:
        info = client.health_info(timeout=30)
    limit = info.max_model_len
    extra = handoff.HANDOFF_TOKENS
    too_long = [n for n in lengths if limit and n + extra > limit]
    if too_long:
        raise BenchmarkError(
            f"the service at {target.address} serves {info.model or 'a model'} with a context "
            f"window of {limit} tokens: lengths {too_long} (+{extra} generated tokens) do not "
            f"fit; choose --lengths up to {limit - extra}"
        )
    if args.vocab_size:
        return int(args.vocab_size)
    if info.vocab_size:
        return int(info.vocab_size)
    return builtin_vocab(args.model)  # a service that does not report its vocabulary


def _transfer(stats: list[dict[str, float]]) -> dict[str, float]:
    """Prefill -> decode KV pushes of the whole run (warm-up included), as the prefill workers
    counted them: blocks, bytes, seconds spent pushing, GB/s."""
    out = {k: sum(s.get(f"push_{k}", 0.0) for s in stats)
           for k in ("blocks", "bytes", "seconds", "failures")}
    out["gbps"] = out["bytes"] / out["seconds"] / 1e9 if out["seconds"] > 0 else 0.0
    return out


def _cycle(client: Any, target: Target, prompt: list[int], modes: tuple[str, ...],
           salt: str, strict_tokens: bool = True) -> list[tuple[str, Any]]:
    """Cold, then each warm mode; every warm run checked (tier, output) before it counts."""
    out: list[tuple[str, Any]] = []
    cold = None
    for mode in modes:
        if mode in ("host", "disk"):
            assert target.evict is not None
            target.evict(mode)
        res = client.generate(prompt_token_ids=prompt, max_tokens=2, temperature=0.0,
                              cache_salt=salt)
        by_tier = dict(res.usage.cached_tokens_by_tier)
        if mode == "cold":
            cold = res
            if res.usage.cached_tokens:
                raise BenchmarkError(f"cold run of {len(prompt)} tokens found {by_tier} cached")
        else:
            assert cold is not None
            if not res.usage.cached_tokens:
                raise BenchmarkError(f"warm run of {len(prompt)} tokens found nothing cached")
            # The router's prefetch hint may lift disk blocks to the host tier before the
            # prefill reads them: a warm-disk run is then served partly "by host" (it still
            # waited for the disk read, which started with the request).
            allowed = {"disk", "host"} if mode == "disk" else {mode}
            if mode != "warm" and not (set(by_tier) <= allowed and (by_tier or mode == "disk")):
                raise BenchmarkError(
                    f"warm-{mode} run of {len(prompt)} tokens was served by {by_tier}")
            if strict_tokens and res.token_ids != cold.token_ids:
                raise BenchmarkError(f"warm output {res.token_ids} != {cold.token_ids}")
        out.append((mode, res))
    return out
