"""The ``strata`` command line: the parser and the dispatch of the service's subcommands.

``strata.cli`` is the installed entry point: it sends ``strata bench ...`` to ``bench.cli`` and
everything else here. A user's mistake (``cluster.errors.CliError``, a bad value, an unreachable
cluster) ends in one line on stderr and a non-zero exit; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from cluster import flags
from cluster.flags import (
    ENGINE_FLAGS,
    ENV_CONFIG,
    ENV_RAY_ADDRESS,
    ENV_SECRET,
    ENV_TOKEN,
    STORE_FLAGS,
    bounded_float,
    bounded_int,
    port_number,
)

BENCH_HELP = "benchmarks: ttft | longdoc | trace | decode | transfer | soak | router | offload " \
    "| gpu"


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage block is for ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="strata", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    gen = sub.add_parser("generate", help="generate text, in-process or through a running service")
    flags.add_model_args(gen)
    flags.add_store_args(gen)
    flags.add_sampling_args(gen)
    flags.add_client_args(gen, server_default=None)
    gen.add_argument(
        "--timeout", type=bounded_float("--timeout", 0.0, 86400.0, lo_open=True), default=600.0
    )

    demo = sub.add_parser(
        "demo",
        help="the main job: a long document and follow-up questions through the service "
        "(or --in-process), each answer with its TTFT and cache tier",
    )
    flags.add_model_args(demo)
    flags.add_store_args(demo)
    demo.set_defaults(model="smollm2-135m")
    demo.add_argument(
        "--document", default=None, help="text file to ask about (default: the built-in one)"
    )
    demo.add_argument("--in-process", action="store_true", help="one engine in this process")

    up = sub.add_parser("up", help="start the service (embedded local Ray, or --address)")
    flags.add_model_args(up)
    flags.add_store_args(up)
    up.add_argument(
        "--address",
        default=None,
        help=f"Ray cluster address (e.g. auto; env {ENV_RAY_ADDRESS}); default: embedded",
    )
    up.add_argument(
        "--prefill",
        type=bounded_int("--prefill", 0, 1024),
        default=None,
        help="prefill workers (default 1; 0: colocated, decode workers compute prompts too)",
    )
    up.add_argument(
        "--decode", type=bounded_int("--decode", 1, 1024), default=None, help="decode workers"
    )
    up.add_argument(
        "--config", default=None, help=f"service YAML (env {ENV_CONFIG}; flags override it)"
    )
    up.add_argument("--host", default=None, help="gRPC bind address (default 127.0.0.1)")
    up.add_argument(
        "--port", type=port_number("--port"), default=None, help="gRPC port (default 50051)"
    )
    up.add_argument(
        "--token", default=None, help=f"require this bearer token from clients (env {ENV_TOKEN})"
    )
    up.add_argument(
        "--secret", default=None, help=f"shared secret of the KV transfer API (env {ENV_SECRET})"
    )
    up.add_argument(
        "--metrics-port",
        type=port_number("--metrics-port"),
        default=None,
        help="Prometheus /metrics port (0 picks a free one)",
    )
    up.add_argument(
        "--http-port",
        type=port_number("--http-port"),
        default=None,
        help="OpenAI-compatible HTTP API port (/v1/chat/completions, ...); off if unset",
    )
    # A flag left out keeps the env's or the YAML's value: nothing set means "not given".
    up.set_defaults(**{a: None for a in (*ENGINE_FLAGS.values(), *STORE_FLAGS.values())})
    up.add_argument(
        "--detach",
        action="store_true",
        help="leave the service running (starts a Ray head if no --address)",
    )

    scale = sub.add_parser("scale", help="change the worker counts of a running service")
    scale.add_argument(
        "--prefill", type=bounded_int("--prefill", 0, 1024), default=None,
        help="prefill workers wanted",
    )
    scale.add_argument(
        "--decode", type=bounded_int("--decode", 1, 1024), default=None,
        help="decode workers wanted",
    )
    scale.add_argument(
        "--address", default=None, help=f"Ray cluster address (env {ENV_RAY_ADDRESS}; auto)"
    )
    scale.add_argument("--namespace", default="strata", help="Ray namespace of the service")
    scale.add_argument(
        "--drain-timeout",
        type=bounded_float("--drain-timeout", 0.0, 86400.0),
        default=60.0,
        help="seconds a removed worker's running requests get to finish",
    )
    scale.add_argument(
        "--start-timeout",
        type=bounded_float("--start-timeout", 0.0, 86400.0, lo_open=True),
        default=600.0,
        help="seconds a new worker gets to load its model and join",
    )

    down = sub.add_parser("down", help="stop a detached service")
    down.add_argument(
        "--address", default=None, help=f"Ray cluster address (env {ENV_RAY_ADDRESS}; auto)"
    )
    down.add_argument("--namespace", default="strata", help="Ray namespace of the service")
    down.add_argument(
        "--stop-ray",
        action="store_true",
        help="also stop the Ray head that `strata up --detach` started",
    )

    stats = sub.add_parser("stats", help="metrics of a running service, a table per worker")
    flags.add_client_args(stats, server_default=flags.DEFAULT_SERVER)
    stats.add_argument("--json", action="store_true")

    sub.add_parser("bench", help=BENCH_HELP, add_help=False)
    return parser


def _dispatch(args: argparse.Namespace) -> int:
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
        from cluster.lifecycle import run_down

        return run_down(args)
    if args.command == "stats":
        from cluster.remote import run_stats

        return run_stats(args)
    # `strata bench` is dispatched by strata.cli before this parser runs.
    raise flags_error("`bench` runs through the `strata` command: strata bench --help")


def flags_error(message: str) -> Exception:
    from cluster.errors import UsageError

    return UsageError(message)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from cluster.quiet import quiet_ray

    quiet_ray()
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("strata: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user, the traceback with --debug
        if args.debug:
            raise
        return report_error(e)


def report_error(e: BaseException) -> int:
    """One line on stderr for ``e`` and its exit code."""
    from cluster.errors import CliError

    hint = ""
    if isinstance(e, CliError):
        code, text = e.exit_code, str(e)
    elif isinstance(e, (ValueError, OSError)):
        code, text = 2, str(e)
    else:
        code, text = 1, f"{type(e).__name__}: {e}"
        hint = " (`strata --debug ...` shows the traceback)"
    lines = text.strip().splitlines()
    print(f"error: {lines[0] if lines else type(e).__name__}{hint}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
