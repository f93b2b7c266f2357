"""The ``strata`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from cluster.sizes import parse_size


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="built-in name (tiny, llama-3.2-1b, "
                   "llama-3.1-8b) or a local Hugging Face checkpoint directory")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-batched-tokens", type=int, default=2048,
                   help="tokens per engine step (the prefill chunk size)")


def _add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device-capacity", type=parse_size, default=None,
                   help="KV pool size in bytes (e.g. 512M); default 1G on CPU, 85%% of free GPU memory")
    p.add_argument("--host-capacity", type=parse_size, default=parse_size("1G"),
                   help="host tier size (e.g. 2G); 0 turns it off")
    p.add_argument("--disk-path", default=None, help="LMDB directory of the disk tier (off if unset)")
    p.add_argument("--disk-capacity", type=parse_size, default=parse_size("8G"),
                   help="disk tier size (LMDB map_size); 0 turns it off")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-ids", help="comma-separated token ids")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop-token-ids", default="", help="comma-separated ids that end generation")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--cache-salt", default="", help="tenant isolation: different salts never share KV")
    p.add_argument("--json", action="store_true", help="print one JSON object")


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
    gen.add_argument("--server", default=None, help="HOST:PORT of a running service (else in-process)")
    gen.add_argument("--token", default=None, help="bearer token for the service")
    gen.add_argument("--timeout", type=float, default=600.0)

    demo = sub.add_parser("demo", help="the main job: a long prompt twice, cold then cached")
    _add_model_args(demo)
    _add_store_args(demo)
    demo.add_argument("--prompt-tokens", type=int, default=2048)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "generate":
        from cluster.generate import run_generate

        return run_generate(args)
    if args.command == "demo":
        from cluster.demo import run_demo

        return run_demo(args)
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
