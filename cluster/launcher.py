"""Start and stop the service on Ray: an embedded local cluster, or an existing one (``address``).

Workers are Ray actors placed by the custom resources ``prefill`` and ``decode`` when the cluster
offers them (so a cluster can dedicate nodes to each role), anywhere otherwise. The router is an
actor too; it serves gRPC. With ``detach`` the actors are named and outlive this process, and
``strata down`` finds them by name.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from cluster.config import ServiceConfig

logger = logging.getLogger(__name__)

ROUTER_NAME = "strata-router"
_ENV_VARS = {"PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}


@dataclass
class Service:
    address: str  # host:port of the gRPC API
    router: Any  # Ray actor handle
    prefill: list[Any] = field(default_factory=list)
    decode: list[Any] = field(default_factory=list)
    owns_ray: bool = False  # this process started the Ray cluster (and stops it)
    http_address: str | None = None  # host:port of the OpenAI-compatible HTTP API, if on

    def shutdown(self) -> None:
        shutdown_actors(self.router, self.prefill + self.decode)
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()


def connect(address: str | None, cfg: ServiceConfig) -> bool:
    """Join the cluster at ``address`` or start an embedded one; True if this process owns it."""
    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": _ENV_VARS}
    if address:
        ray.init(
            address=address,
            namespace=cfg.namespace,
            runtime_env=runtime_env,
            logging_level=logging.WARNING,
        )
        return False
    n = cfg.num_prefill + cfg.num_decode
    ray.init(
        namespace=cfg.namespace,
        runtime_env=runtime_env,
        include_dashboard=False,
        resources={"prefill": float(max(cfg.num_prefill, 1)), "decode": float(cfg.num_decode)},
        num_cpus=max(2, os.cpu_count() or 2),
        object_store_memory=256 << 20,
        logging_level=logging.WARNING,
        _system_config={"worker_register_timeout_seconds": 120},
        ignore_reinit_error=True,
    ) if n else None
    return True


def _role_resources(role: str) -> dict[str, float]:
    total = ray.cluster_resources()
    if total.get(role, 0) >= 1:
        return {role: 1.0}
    logger.warning("the cluster offers no %r resource: %s workers are placed anywhere", role, role)
    return {}


def launch(cfg: ServiceConfig, address: str | None = None, detach: bool = False) -> Service:
    from decode_worker.actor import decode_actor_class
    from prefill_worker.actor import prefill_actor_class
    from router.actor import RouterActor

    owns = connect(address, cfg)
    common: dict[str, Any] = {"max_concurrency": 256, "num_cpus": 0}
    if detach:
        common["lifetime"] = "detached"
    kv_host = "127.0.0.1" if not address else "0.0.0.0"
    prefill, decode = [], []
    for i in range(cfg.num_prefill):
        wid = f"prefill-{i}"
        opts = {**common, "resources": _role_resources("prefill"), "name": f"strata-{wid}"}
        prefill.append(
            prefill_actor_class(**opts).remote(
                wid, cfg.engine, cfg.store_for(wid), cfg.secret, kv_host, transfer=cfg.transfer
            )
        )
    for i in range(cfg.num_decode):
        wid = f"decode-{i}"
        opts = {**common, "resources": _role_resources("decode"), "name": f"strata-{wid}"}
        decode.append(
            decode_actor_class(**opts).remote(
                wid, cfg.engine, cfg.store_for(wid), cfg.secret, kv_host
            )
        )
    workers = [("prefill", h) for h in prefill] + [("decode", h) for h in decode]
    router = (
        ray.remote(RouterActor)
        .options(name=ROUTER_NAME, **common)
        .remote(workers, cfg.engine.model, cfg.router, cfg.backend, cfg.secret)
    )
    try:
        grpc_address = ray.get(router.address_of.remote(), timeout=600)
        http_port = ray.get(router.http_port_of.remote(), timeout=60)
    except Exception:
        shutdown_actors(router, prefill + decode)
        if owns:
            ray.shutdown()
        raise
    http = f"{grpc_address.rsplit(':', 1)[0]}:{http_port}" if http_port is not None else None
    return Service(grpc_address, router, prefill, decode, owns_ray=owns, http_address=http)


def shutdown_actors(router: Any, workers: list[Any]) -> None:
    for handle in [router, *workers]:
        try:
            ray.get(handle.shutdown.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - already dead is fine
            pass
        try:
            ray.kill(handle)
        except Exception:  # noqa: BLE001
            pass


def start_head(cfg: ServiceConfig) -> None:
    """``ray start --head`` in the background, so detached actors outlive this process."""
    res = f'{{"prefill": {cfg.num_prefill}, "decode": {cfg.num_decode}}}'
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "ray"),
        "start",
        "--head",
        "--include-dashboard=false",
        f"--resources={res}",
        "--disable-usage-stats",
    ]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, **_ENV_VARS})
    time.sleep(1.0)


def down(address: str | None, namespace: str = "strata", stop_ray: bool = False) -> int:
    """Kill the named actors of a detached service; returns how many were found."""
    ray.init(address=address or "auto", namespace=namespace, logging_level=logging.WARNING)
    found = 0
    for name in [ROUTER_NAME] + [a["name"] for a in _named_workers(namespace)]:
        try:
            handle = ray.get_actor(name)
        except ValueError:
            continue
        found += 1
        shutdown_actors(handle, [])
    ray.shutdown()
    if stop_ray:
        subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "ray"), "stop"],
            check=False,
            capture_output=True,
        )
    return found


def _named_workers(namespace: str) -> list[dict[str, str]]:
    from ray.util import list_named_actors

    return [
        a
        for a in list_named_actors(all_namespaces=True)
        if isinstance(a, dict)
        and a.get("namespace") == namespace
        and a.get("name", "").startswith("strata-")
        and a.get("name") != ROUTER_NAME
    ]
