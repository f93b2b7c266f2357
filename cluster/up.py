"""``strata up``: build the service config (flags > environment > YAML > defaults), check it
before Ray starts anything, launch, then wait or detach.

Without ``--address`` a foreground ``up`` runs its own embedded Ray cluster; ``--detach`` starts
(or finds) the loopback head of ``cluster.lifecycle``. A service that already runs there, or on
the gRPC port asked for, is reported (where it listens, how to stop it) with exit 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import threading

from cluster import flags
from cluster.config import ServiceConfig
from cluster.errors import ServiceRunningError, UsageError
from cluster.flags import ENGINE_FLAGS, STORE_FLAGS, env
from engine.config import EngineConfig
from router.config import RouterConfig

# RouterConfig field -> (flag attribute, environment variable)
ROUTER_SETTINGS = {
    "host": ("host", flags.ENV_HOST),
    "port": ("port", flags.ENV_PORT),
    "auth_token": ("token", flags.ENV_TOKEN),
    "metrics_port": ("metrics_port", flags.ENV_METRICS_PORT),
    "http_port": ("http_port", flags.ENV_HTTP_PORT),
}
_PORT_FIELDS = ("port", "metrics_port", "http_port")


def _given(args: argparse.Namespace, mapping: dict[str, str]) -> dict[str, object]:
    """The flags given on the command line (``strata up`` leaves the others at None)."""
    return {f: getattr(args, a) for f, a in mapping.items() if getattr(args, a) is not None}


def _env_port(name: str, value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise UsageError(f"{name}={value!r}: not a port number") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"{name}={value}: a port must be in [0, 65535]")
    return port


def router_overrides(args: argparse.Namespace) -> dict[str, object]:
    """Router settings from the flags, else from the environment."""
    out: dict[str, object] = {}
    for field, (attr, var) in ROUTER_SETTINGS.items():
        value = getattr(args, attr)
        if value is None and env(var) is not None:
            raw = str(env(var))
            value = _env_port(var, raw) if field in _PORT_FIELDS else raw
        if value is not None:
            out[field] = value
    return out


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    """The YAML (``--config``, else ``STRATA_CONFIG``; or the defaults), overridden by the
    environment, overridden by the flags that were given."""
    path = args.config or env(flags.ENV_CONFIG)
    cfg = ServiceConfig.from_yaml(path) if path else ServiceConfig()
    eng = dataclasses.replace(cfg.engine, **_given(args, ENGINE_FLAGS))
    store = dataclasses.replace(cfg.store, **_given(args, STORE_FLAGS))
    router = dataclasses.replace(cfg.router, **router_overrides(args))
    secret = args.secret if args.secret is not None else env(flags.ENV_SECRET)
    return dataclasses.replace(
        cfg,
        engine=eng,
        store=store,
        router=router,
        num_prefill=args.prefill if args.prefill is not None else cfg.num_prefill,
        num_decode=args.decode if args.decode is not None else cfg.num_decode,
        secret=secret if secret is not None else cfg.secret,
    )


def preflight(args: argparse.Namespace) -> None:
    """The model, ports and disk path this ``up`` would use, checked from the flags, the
    environment and the YAML as they are (building ``ServiceConfig`` imports torch)."""
    import yaml

    from cluster.preflight import check_service

    path = args.config or env(flags.ENV_CONFIG)
    raw: dict = {}
    if path:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UsageError(f"{path}: cannot read config: {e}") from None
        if not isinstance(raw, dict):
            raise UsageError(f"{path}: expected a mapping at the top level")

    def section(name: str) -> dict:
        value = raw.get(name) or {}
        return value if isinstance(value, dict) else {}

    defaults = RouterConfig()
    router = {**section("router"), **router_overrides(args)}
    ports = {
        "--port": router.get("port", defaults.port),
        "--http-port": router.get("http_port"),
        "--metrics-port": router.get("metrics_port"),
    }
    model = args.model or section("engine").get("model") or EngineConfig.model
    disk = args.disk_path or section("store").get("disk_path")
    check_service(str(model), str(router.get("host") or defaults.host), ports, disk)


def _running_service(namespace: str) -> str | None:
    """Where the service of ``namespace`` in the joined cluster listens, if one runs."""
    import ray

    from cluster.launcher import ROUTER_NAME

    try:
        router = ray.get_actor(ROUTER_NAME, namespace=namespace)
        address = ray.get(router.address_of.remote(), timeout=10)
    except Exception:  # no router (or a dying one): nothing runs
        return None
    return str(address)


def run_up(args: argparse.Namespace) -> int:
    preflight(args)  # before Ray or torch is imported: a mistake is reported at once
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    from cluster.launcher import connect, launch
    from cluster.lifecycle import record_head, start_head, stop_head

    address = args.address or env(flags.ENV_RAY_ADDRESS)
    local = fresh = False
    if args.detach and not address:
        roles = {"prefill": max(cfg.num_prefill, 1), "decode": cfg.num_decode}
        address, fresh = start_head(roles)
        local = True
    try:
        if address:
            connect(address, cfg, local=local)
            running = _running_service(cfg.namespace)
            if running is not None:
                raise ServiceRunningError(
                    f"a Strata service already runs in this Ray cluster: gRPC on {running}; "
                    "stop it with `strata down`"
                )
        svc = launch(cfg, address=address, detach=args.detach, local=local)
    except BaseException:
        if fresh:  # a head this call started serves nothing: leave nothing behind
            import ray

            ray.shutdown()
            stop_head()
        raise
    print(
        f"strata: serving gRPC on {svc.address} "
        f"({cfg.num_prefill} prefill + {cfg.num_decode} decode workers, model {cfg.engine.model})",
        flush=True,
    )
    if svc.http_address:
        print(f"strata: OpenAI-compatible HTTP API on http://{svc.http_address}/v1", flush=True)
    if svc.metrics_address:
        print(f"strata: Prometheus metrics on http://{svc.metrics_address}/metrics", flush=True)
    if args.detach:
        if local:
            record_head(grpc=svc.address, http=svc.http_address, metrics=svc.metrics_address)
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
