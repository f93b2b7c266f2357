"""The main job (``make run``): a long document twice, cold then served from the KV cache."""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time

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
    if args.in_process:
        return _run_in_process(args)
    return _run_service(args)


QUESTIONS = (
    "\nQuestion: what does the cache keep?\nAnswer:",
    "\nQuestion: where do blocks go when memory fills?\nAnswer:",
    "\nQuestion: what is loaded instead of computed?\nAnswer:",
)


def _run_service(args: argparse.Namespace) -> int:
    """Start the service (embedded Ray), send a long document twice and follow-up questions
    through gRPC, print TTFT and the tier that served the prefix, shut down."""
    import ray

    from cluster.config import ServiceConfig
    from cluster.generate import engine_config_from_args, store_config_from_args
    from cluster.launcher import launch
    from router.client import StrataClient
    from router.config import RouterConfig

    with tempfile.TemporaryDirectory(prefix="strata-demo-") as tmp:
        cfg = ServiceConfig(
            engine=engine_config_from_args(args),
            store=store_config_from_args(args, args.disk_path or tmp),
            router=RouterConfig(port=0),
        )
        t0 = time.perf_counter()
        print(
            f"starting the service: 1 prefill + 1 decode worker, model {args.model} ...", flush=True
        )
        svc = launch(cfg)
        print(f"serving gRPC on {svc.address} (up in {time.perf_counter() - t0:.1f} s)", flush=True)
        try:
            doc = long_document(args.prompt_tokens)
            plan = [
                ("document + question 1 (cold)", QUESTIONS[0], None),
                ("same request again", QUESTIONS[0], None),
                ("follow-up question 2", QUESTIONS[1], None),
                ("follow-up question 3, prefix on disk", QUESTIONS[2], "disk"),
            ]
            outputs = []
            with StrataClient(svc.address) as client:
                for label, question, evict in plan:
                    if evict:
                        for h in svc.prefill + svc.decode:
                            ray.get(h.evict_cached.remote(evict), timeout=120)
                    res = client.generate(
                        prompt=doc + question, max_tokens=16, temperature=0.0, timeout=600
                    )
                    u = res.usage
                    tiers = ", ".join(f"{k}={v}" for k, v in u.cached_tokens_by_tier.items()) or "-"
                    print(
                        f"  {label:<38} prompt {u.prompt_tokens:>5} tok  "
                        f"ttft {res.ttft_ms_client:8.1f} ms  "
                        f"cached {u.cached_tokens:>5} ({tiers})  "
                        f"{u.prefill_worker} -> {u.decode_worker}"
                    )
                    outputs.append(res)
            if outputs[0].token_ids != outputs[1].token_ids:
                print("error: the cached run's output differs from the cold run's", file=sys.stderr)
                return 1
            print(
                f"  warm/cold TTFT: {outputs[1].ttft_ms_client / outputs[0].ttft_ms_client:.3f} "
                "(identical output tokens)"
            )
            return 0
        finally:
            svc.shutdown()
            print("service stopped", flush=True)


def _run_in_process(args: argparse.Namespace) -> int:
    from cluster.generate import engine_from_args
    from engine.sampling import SamplingParams

    with tempfile.TemporaryDirectory(prefix="strata-demo-") as tmp:
        if args.disk_path is None:
            args.disk_path = tmp
        engine = engine_from_args(args)
        try:
            assert engine.tokenizer is not None
            ids = engine.tokenizer.encode(long_document(args.prompt_tokens) + QUESTIONS[0])
            sampling = SamplingParams(max_tokens=16)
            print(
                f"model {args.model}: prompt of {len(ids)} tokens, {engine.device}, "
                f"pool {engine.num_blocks} blocks of {engine.block_size} tokens"
            )
            rows = []
            for label in ("cold", "cached"):
                out = engine.generate([ids], sampling)[0]
                rows.append(out)
                tiers = ", ".join(f"{k}={v}" for k, v in out.cached_by_tier.items()) or "-"
                print(
                    f"  {label:<7} ttft {out.ttft_s * 1000:8.1f} ms   cached tokens "
                    f"{out.num_cached_tokens:>5} ({tiers})"
                )
            if rows[0].output_token_ids != rows[1].output_token_ids:
                print("error: cached output differs from cold output", file=sys.stderr)
                return 1
            print(
                f"  cached/cold TTFT ratio: {rows[1].ttft_s / rows[0].ttft_s:.3f} "
                "(same output tokens)"
            )
            return 0
        finally:
            engine.close()
