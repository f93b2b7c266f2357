"""``strata generate``: in-process (an engine in this process) or through a running service."""

from __future__ import annotations

import argparse
import sys
import time

from cluster.flags import chat_messages, parse_ids, print_result
from textproc.tokenizer import Tokenizer, render_chat


def engine_config_from_args(args: argparse.Namespace):  # an EngineConfig
    from cluster.flags import ENGINE_FLAGS
    from engine.config import EngineConfig

    return EngineConfig(**{f: getattr(args, a) for f, a in ENGINE_FLAGS.items()})


def store_config_from_args(args: argparse.Namespace, disk_path: str | None = None):
    """The store flags; ``disk_path`` overrides ``--disk-path`` (no path: no disk tier)."""
    from kvstore.config import StoreConfig

    path = disk_path or args.disk_path
    return StoreConfig(
        host_capacity_bytes=args.host_capacity,
        disk_path=path,
        disk_capacity_bytes=args.disk_capacity if path else 0,
    )


def engine_from_args(args: argparse.Namespace):
    from engine.engine import LLMEngine

    return LLMEngine(engine_config_from_args(args), store_config_from_args(args))


def _prompt_ids(args: argparse.Namespace, tokenizer: Tokenizer | None) -> list[int]:
    """The prompt of ``--prompt``, ``--chat`` (rendered with the chat template) or
    ``--prompt-ids``; ValueError saying what is missing."""
    messages = chat_messages(args)
    if messages is not None:
        return render_chat(tokenizer, messages)
    if args.prompt is not None:
        if tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json; pass --prompt-ids")
        return tokenizer.encode(args.prompt)
    return parse_ids(args.prompt_ids)


def run_generate(args: argparse.Namespace) -> int:
    if args.server:
        from cluster.remote import run_remote_generate

        return run_remote_generate(args)
    from engine.sampling import SamplingParams

    try:
        sampling = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop_token_ids=tuple(parse_ids(args.stop_token_ids, "--stop-token-ids")),
            ignore_eos=args.ignore_eos,
        )
        engine = engine_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        try:
            prompt_ids = _prompt_ids(args, engine.tokenizer)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        try:
            out = engine.generate([prompt_ids], sampling, cache_salt=args.cache_salt)[0]
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        text = engine.tokenizer.decode(out.output_token_ids) if engine.tokenizer else ""
        print_result(
            {
                "output_token_ids": out.output_token_ids,
                "text": text,
                "finish_reason": out.finish_reason,
                "prompt_tokens": len(prompt_ids),
                "ttft_ms": out.ttft_s * 1000.0,
                "latency_ms": (time.perf_counter() - t0) * 1000.0,
                "cached_tokens": out.num_cached_tokens,
                "cached_tokens_by_tier": out.cached_by_tier,
                "load_ms": out.load_s * 1000.0,  # of ttft_ms: the prefix's load from the store
            },
            args.json,
        )
        return 0
    finally:
        engine.close()
