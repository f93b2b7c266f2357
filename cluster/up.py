"""``strata up``: build the service config from YAML and flags, launch, wait or detach."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading

from cluster.config import ServiceConfig


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    cfg = ServiceConfig.from_yaml(args.config) if args.config else ServiceConfig()
    eng = dataclasses.replace(
        cfg.engine,
        model=args.model if args.model != "tiny" or not args.config else cfg.engine.model,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        max_model_len=args.max_model_len or cfg.engine.max_model_len,
        max_num_batched_tokens=args.max_batched_tokens,
        kv_cache_bytes=args.device_capacity
        if args.device_capacity is not None
        else cfg.engine.kv_cache_bytes,
    )
    store = dataclasses.replace(
        cfg.store,
        host_capacity_bytes=args.host_capacity,
        disk_path=args.disk_path or cfg.store.disk_path,
        disk_capacity_bytes=args.disk_capacity,
    )
    router_kw = {
        k: v
        for k, v in (
            ("host", args.host),
            ("port", args.port),
            ("auth_token", args.token),
            ("metrics_port", args.metrics_port),
        )
        if v is not None
    }
    router = dataclasses.replace(cfg.router, **router_kw)
    return dataclasses.replace(
        cfg,
        engine=eng,
        store=store,
        router=router,
        num_prefill=args.prefill or cfg.num_prefill,
        num_decode=args.decode or cfg.num_decode,
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
        start_head(cfg)
        address = "auto"
    svc = launch(cfg, address=address, detach=args.detach)
    print(
        f"strata: serving gRPC on {svc.address} "
        f"({cfg.num_prefill} prefill + {cfg.num_decode} decode workers, model {cfg.engine.model})",
        flush=True,
    )
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
