"""``strata up``: build the service config from YAML and flags, launch, wait or detach."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading

from cluster.cli import ENGINE_FLAGS, STORE_FLAGS
from cluster.config import ServiceConfig


def _given(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, object]:
    """The flags given on the command line (``strata up`` leaves the others at None)."""
    return {f: getattr(args, a) for f, a in flags.items() if getattr(args, a) is not None}


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    """The YAML (or the defaults), overridden by the flags that were given."""
    cfg = ServiceConfig.from_yaml(args.config) if args.config else ServiceConfig()
    eng = dataclasses.replace(cfg.engine, **_given(args, ENGINE_FLAGS))
    store = dataclasses.replace(cfg.store, **_given(args, STORE_FLAGS))
    router_kw = {
        k: v
        for k, v in (
            ("host", args.host),
            ("port", args.port),
            ("auth_token", args.token),
            ("metrics_port", args.metrics_port),
            ("http_port", args.http_port),
        )
        if v is not None
    }
    router = dataclasses.replace(cfg.router, **router_kw)
    return dataclasses.replace(
        cfg,
        engine=eng,
        store=store,
        router=router,
        num_prefill=args.prefill if args.prefill is not None else cfg.num_prefill,
        num_decode=args.decode if args.decode is not None else cfg.num_decode,
        secret=args.secret if args.secret is not None else cfg.secret,
    )


def run_up(args: argparse.Namespace) -> int:
    from cluster.launcher import launch, start_head

    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    address = args.address
    if args.detach and not address:
        try:
            started = start_head(cfg)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not started:
            print(
                "strata: a Ray cluster already runs on this machine: joining it (its nodes need "
                "the `prefill`/`decode` resources to place the roles; `strata down --stop-ray` "
                "or `ray stop` ends it)",
                flush=True,
            )
        address = "auto"
    svc = launch(cfg, address=address, detach=args.detach)
    print(
        f"strata: serving gRPC on {svc.address} "
        f"({cfg.num_prefill} prefill + {cfg.num_decode} decode workers, model {cfg.engine.model})",
        flush=True,
    )
    if svc.http_address:
        print(f"strata: OpenAI-compatible HTTP API on http://{svc.http_address}/v1", flush=True)
    if args.detach:
        print("strata: detached; stop it with `strata down`", flush=True)
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("strata: press Ctrl-C to stop", flush=True)
    stop.wait()
    svc.shutdown()
    print("strata: stopped", flush=True)
    return 0
