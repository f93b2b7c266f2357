"""Flags and helpers the ``strata`` subcommands share: model, store and sampling flags, numeric
bounds checked at parse time, settings taken from the environment, and the result printer.

Every subcommand module imports this one (never ``cluster.cli``), so the command line has no
import cycle: ``cli`` -> subcommands -> ``flags``.

Precedence of a setting: a flag on the command line, then its environment variable, then the
service YAML (``--config`` / ``STRATA_CONFIG``), then the built-in default.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable

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
}
STORE_FLAGS = {
    "host_capacity_bytes": "host_capacity",
    "disk_path": "disk_path",
    "disk_capacity_bytes": "disk_capacity",
}

# Environment variables a deployment passes in (flag > env > YAML > default).
ENV_TOKEN = "STRATA_TOKEN"  # bearer token: `up` requires it, clients send it
ENV_SECRET = "STRATA_SECRET"  # shared secret of the KV transfer API between workers
ENV_SERVER = "STRATA_SERVER"  # HOST:PORT of a running service (generate --server, stats)
ENV_RAY_ADDRESS = "STRATA_RAY_ADDRESS"  # Ray cluster address (up/scale/down --address)
ENV_CONFIG = "STRATA_CONFIG"  # service YAML of `strata up`
ENV_HOST = "STRATA_HOST"  # gRPC bind address of `strata up`
ENV_PORT = "STRATA_PORT"  # gRPC port of `strata up`
ENV_HTTP_PORT = "STRATA_HTTP_PORT"  # OpenAI-compatible HTTP API port of `strata up`
ENV_METRICS_PORT = "STRATA_METRICS_PORT"  # Prometheus /metrics port of `strata up`
DEFAULT_SERVER = "127.0.0.1:50051"

MAX_TOKENS_LIMIT = (1 << 31) - 1  # the wire's int32
SEED_LIMIT = (1 << 64) - 1  # the wire's uint64


def env(name: str) -> str | None:
    """The environment variable ``name``, None when unset or empty."""
    value = os.environ.get(name, "").strip()
    return value or None


def bounded_int(flag: str, lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[lo, hi]`` (argparse prints the message, names the
    flag and exits 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: not an integer: {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"{flag} must be {rng}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def bounded_float(
    flag: str, lo: float, hi: float | None = None, lo_open: bool = False
) -> Callable[[str], float]:
    """An argparse type: a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: not a number: {text!r}") from None
        low_ok = value > lo if lo_open else value >= lo
        if not math.isfinite(value) or not low_ok or (hi is not None and value > hi):
            left = "(" if lo_open else "["
            rng = f"{left}{lo}, {hi}]" if hi is not None else f"{'>' if lo_open else '>='} {lo}"
            raise argparse.ArgumentTypeError(f"{flag} must be in {rng}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


def port_number(flag: str) -> Callable[[str], int]:
    return bounded_int(flag, 0, 65535)


def size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="tiny",
        help="built-in name (tiny, smollm2-135m, llama-3.2-1b, llama-3.1-8b), a local Hugging "
        "Face checkpoint directory or a Llama-family *.gguf file",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument(
        "--block-size", type=bounded_int("--block-size", 1, 4096), default=16,
        help="tokens per KV block",
    )
    p.add_argument(
        "--max-model-len",
        type=bounded_int("--max-model-len", 2, 1 << 24),
        default=None,
        help="context window: prompt + generated tokens (default: the model's)",
    )
    p.add_argument(
        "--max-batched-tokens",
        type=bounded_int("--max-batched-tokens", 1, 1 << 24),
        default=2048,
        help="tokens per engine step (the prefill chunk size)",
    )


def add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device-capacity",
        type=size,
        default=None,
        help="KV pool size in bytes (e.g. 512M); default 1G on CPU, 85%% of free GPU memory",
    )
    p.add_argument(
        "--host-capacity",
        type=size,
        default=parse_size("1G"),
        help="host tier size (e.g. 2G); 0 turns it off",
    )
    p.add_argument(
        "--disk-path", default=None, help="LMDB directory of the disk tier (off if unset)"
    )
    p.add_argument(
        "--disk-capacity",
        type=size,
        default=parse_size("8G"),
        help="disk tier size (LMDB map_size); 0 turns it off",
    )


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-ids", help="comma-separated token ids")
    g.add_argument(
        "--chat", help="a user message, rendered with the model's chat template (chat models)"
    )
    p.add_argument("--system", default=None, help="with --chat: a system message before it")
    p.add_argument(
        "--max-tokens", type=bounded_int("--max-tokens", 1, MAX_TOKENS_LIMIT), default=32
    )
    p.add_argument(
        "--temperature", type=bounded_float("--temperature", 0.0, 100.0), default=0.0
    )
    p.add_argument("--top-p", type=bounded_float("--top-p", 0.0, 1.0, lo_open=True), default=1.0)
    p.add_argument(
        "--top-k", type=bounded_int("--top-k", 0, MAX_TOKENS_LIMIT), default=0,
        help="0 turns it off",
    )
    p.add_argument("--seed", type=bounded_int("--seed", 0, SEED_LIMIT), default=None)
    p.add_argument("--stop-token-ids", default="", help="comma-separated ids that end generation")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument(
        "--cache-salt", default="", help="tenant isolation: different salts never share KV"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_client_args(p: argparse.ArgumentParser, server_default: str | None) -> None:
    """``--server`` and ``--token`` of a command that talks to a running service."""
    p.add_argument(
        "--server",
        default=env(ENV_SERVER) or server_default,
        help=f"HOST:PORT of a running service (env {ENV_SERVER})"
        + ("" if server_default is None else f"; default {server_default}"),
    )
    p.add_argument(
        "--token",
        default=env(ENV_TOKEN),
        help=f"bearer token for the service (env {ENV_TOKEN}, which keeps it out of `ps`)",
    )


def chat_messages(args: argparse.Namespace) -> list[dict[str, str]] | None:
    """``--chat`` (and ``--system``) as chat messages; None without ``--chat``."""
    if args.chat is None:
        if args.system is not None:
            raise ValueError("--system goes with --chat")
        return None
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    return [*system, {"role": "user", "content": args.chat}]


def parse_ids(text: str, flag: str = "--prompt-ids") -> list[int]:
    """Comma-separated token ids (ValueError naming ``flag``)."""
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    bad = [i for i in ids if not 0 <= i < (1 << 31)]
    if bad:
        raise ValueError(f"{flag}: token ids must be in [0, 2^31), got {bad[0]}")
    return ids


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
