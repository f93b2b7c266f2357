"""The ``strata`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from cluster.sizes import parse_size

# ServiceConfig field -> `strata up` flag (the flags shared with `generate` and `demo`)
ENGINE_FLAGS = {
    "model": "model",
    "dtype": "dtype",
    "device": "device",
    "block_size": "block_size",
    "max_model_len": "max_model_len",
    "max_num_batched_tokens": "max_batched_tokens",
    "kv_cache_bytes": "device_capacity",
    "deterministic": "deterministic",
}
STORE_FLAGS = {
    "host_capacity_bytes": "host_capacity",
    "disk_path": "disk_path",
    "disk_capacity_bytes": "disk_capacity",
}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="tiny",
        help="built-in name (tiny, smollm2-135m, llama-3.2-1b, llama-3.1-8b), a local Hugging "
        "Face checkpoint directory or a Llama-family *.gguf file",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context window: prompt + generated tokens (default: the model's)",
    )
    p.add_argument(
        "--max-batched-tokens",
        type=int,
        default=2048,
        help="tokens per engine step (the prefill chunk size)",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="bit-identical results cold, warm from any tier and across the prefill -> decode "
        "handoff (costs recompute and GEMM speed)",
    )


def _add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device-capacity",
        type=parse_size,
        default=None,
        help="KV pool size in bytes (e.g. 512M); default 1G on CPU, 85%% of free GPU memory",
    )
    p.add_argument(
        "--host-capacity",
        type=parse_size,
        default=parse_size("1G"),
        help="host tier size (e.g. 2G); 0 turns it off",
    )
    p.add_argument(
        "--disk-path", default=None, help="LMDB directory of the disk tier (off if unset)"
    )
    p.add_argument(
        "--disk-capacity",
        type=parse_size,
        default=parse_size("8G"),
        help="disk tier size (LMDB map_size); 0 turns it off",
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-ids", help="comma-separated token ids")
    g.add_argument(
        "--chat", help="a user message, rendered with the model's chat template (chat models)"
    )
    p.add_argument("--system", default=None, help="with --chat: a system message before it")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop-token-ids", default="", help="comma-separated ids that end generation")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument(
        "--cache-salt", default="", help="tenant isolation: different salts never share KV"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def chat_messages(args: argparse.Namespace) -> list[dict[str, str]] | None:
    """``--chat`` (and ``--system``) as chat messages; None without ``--chat``."""
    if args.chat is None:
        if args.system is not None:
            raise SystemExit("error: --system goes with --chat")
        return None
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    return [*system, {"role": "user", "content": args.chat}]


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text, in-process or through a running service")
    _add_model_args(gen)
    _add_store_args(gen)
    _add_sampling_args(gen)
    gen.add_argument(
        "--server", default=None, help="HOST:PORT of a running service (else in-process)"
    )
    gen.add_argument("--token", default=None, help="bearer token for the service")
    gen.add_argument("--timeout", type=float, default=600.0)

    demo = sub.add_parser(
        "demo",
        help="the main job: a long document and follow-up questions through the service "
        "(or --in-process), each answer with its TTFT and cache tier",
    )
    _add_model_args(demo)
    _add_store_args(demo)
    demo.set_defaults(model="smollm2-135m")
    demo.add_argument(
        "--document", default=None, help="text file to ask about (default: the built-in one)"
    )
    demo.add_argument("--in-process", action="store_true", help="one engine in this process")

    up = sub.add_parser("up", help="start the service (embedded local Ray, or --address)")
    _add_model_args(up)
    _add_store_args(up)
    up.add_argument(
        "--address", default=None, help="Ray cluster address (e.g. auto); default: embedded"
    )
    up.add_argument(
        "--prefill",
        type=int,
        default=None,
        help="prefill workers (default 1; 0: colocated, decode workers compute prompts too)",
    )
    up.add_argument("--decode", type=int, default=None, help="decode workers")
    up.add_argument("--config", default=None, help="service YAML (flags override it)")
    up.add_argument("--host", default=None, help="gRPC bind address (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=None, help="gRPC port (default 50051)")
    up.add_argument("--token", default=None, help="require this bearer token from clients")
    up.add_argument("--secret", default=None, help="shared secret of the KV transfer API")
    up.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port")
    up.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="OpenAI-compatible HTTP API port (/v1/chat/completions, ...); off if unset",
    )
    # A flag left out keeps the YAML's value (or the default): nothing set means "not given".
    up.set_defaults(**{a: None for a in (*ENGINE_FLAGS.values(), *STORE_FLAGS.values())})
    up.add_argument(
        "--detach",
        action="store_true",
        help="leave the service running (starts a Ray head if no --address)",
    )

    scale = sub.add_parser("scale", help="change the worker counts of a running service")
    scale.add_argument("--prefill", type=int, default=None, help="prefill workers wanted")
    scale.add_argument("--decode", type=int, default=None, help="decode workers wanted")
    scale.add_argument("--address", default=None, help="Ray cluster address (default: auto)")
    scale.add_argument("--namespace", default="strata", help="Ray namespace of the service")
    scale.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="seconds a removed worker's running requests get to finish",
    )

    down = sub.add_parser("down", help="stop a detached service")
    down.add_argument("--address", default=None, help="Ray cluster address (default: auto)")
    down.add_argument("--stop-ray", action="store_true", help="also run `ray stop`")

    stats = sub.add_parser("stats", help="metrics of a running service, a table per worker")
    stats.add_argument("--server", default="127.0.0.1:50051")
    stats.add_argument("--token", default=None)
    stats.add_argument("--json", action="store_true")

    bench = sub.add_parser(
        "bench",
        help="benchmarks: ttft | longdoc | trace | decode | transfer | soak | router | offload "
        "| gpu",
        add_help=False,
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # every flag after it is the benchmark's (--help too)
        from bench.cli import main as bench_main

        return bench_main(argv[1:], prog="strata bench")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "generate":
        from cluster.generate import run_generate

        return run_generate(args)
    if args.command == "demo":
        from cluster.demo import run_demo

        return run_demo(args)
    if args.command == "up":
        from cluster.up import run_up

        return run_up(args)
    if args.command == "scale":
        from cluster.scale import run_scale

        return run_scale(args)
    if args.command == "down":
        from cluster.launcher import down

        n = down(args.address, stop_ray=args.stop_ray)
        print(f"strata: stopped {n} actors")
        print(
            "strata: stopped Ray too"
            if args.stop_ray
            else "strata: Ray is still running (`strata down --stop-ray` or `ray stop` ends it)"
        )
        return 0
    if args.command == "stats":
        from cluster.remote import run_stats

        return run_stats(args)
    if args.command == "bench":
        from bench.cli import main as bench_main

        return bench_main(args.bench_args)
    raise SystemExit(f"unknown command {args.command}")


def print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    print(result["text"] if result.get("text") else result["output_token_ids"])
    by_tier = ", ".join(f"{k} {v}" for k, v in result.get("cached_tokens_by_tier", {}).items())
    print(
        f"[{len(result['output_token_ids'])} tokens, ttft {result['ttft_ms']:.1f} ms, "
        f"cached {result['cached_tokens']} tokens{' (' + by_tier + ')' if by_tier else ''}, "
        f"finish {result['finish_reason']}]",
        file=sys.stderr,
    )


def now_ms() -> float:
    return time.perf_counter() * 1000.0


if __name__ == "__main__":
    sys.exit(main())
