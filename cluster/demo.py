"""The main job (``make run``): a long document twice, cold then served from the KV cache."""

from __future__ import annotations

import argparse
import random
import sys
import tempfile

_WORDS = (
    "the cache keeps every block of keys and values that a prompt has produced so that a later "
    "request with the same prefix loads them instead of computing them again while memory "
    "tiers move blocks from device to host to disk and back as requests come and go"
).split()


def long_document(num_tokens: int, seed: int = 0) -> str:
    """A deterministic English-like document of about ``num_tokens`` bytes (byte tokenizer)."""
    rng = random.Random(seed)
    words: list[str] = []
    size = 0
    while size < num_tokens:
        w = rng.choice(_WORDS)
        words.append(w)
        size += len(w) + 1
    return " ".join(words)[:num_tokens]


def run_demo(args: argparse.Namespace) -> int:
    from cluster.generate import engine_from_args
    from engine.sampling import SamplingParams

    with tempfile.TemporaryDirectory(prefix="strata-demo-") as tmp:
        if args.disk_path is None:
            args.disk_path = tmp
        engine = engine_from_args(args)
        try:
            assert engine.tokenizer is not None
            doc = long_document(args.prompt_tokens)
            question = "\nQuestion: what does the cache keep?\nAnswer:"
            ids = engine.tokenizer.encode(doc + question)
            sampling = SamplingParams(max_tokens=16)
            print(f"model {args.model}: prompt of {len(ids)} tokens, {engine.device}, "
                  f"pool {engine.num_blocks} blocks of {engine.block_size} tokens")
            rows = []
            for label in ("cold", "cached"):
                out = engine.generate([ids], sampling)[0]
                rows.append((label, out))
                tiers = ", ".join(f"{k}={v}" for k, v in out.cached_by_tier.items()) or "-"
                print(f"  {label:<7} ttft {out.ttft_s * 1000:8.1f} ms   cached tokens "
                      f"{out.num_cached_tokens:>5} ({tiers})   output {out.output_token_ids[:8]}...")
            cold, warm = rows[0][1], rows[1][1]
            if cold.output_token_ids != warm.output_token_ids:
                print("error: cached output differs from cold output", file=sys.stderr)
                return 1
            print(f"  cached/cold TTFT ratio: {warm.ttft_s / cold.ttft_s:.3f} (same output tokens)")
            return 0
        finally:
            engine.close()
