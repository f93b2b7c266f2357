"""Start and stop the service on Ray: an embedded local cluster, or an existing one (``address``).

Workers are Ray actors placed by the custom resources ``prefill`` and ``decode`` when the cluster
offers them (so a cluster can dedicate nodes to each role), anywhere otherwise. The router is an
actor too; it serves gRPC. With ``detach`` the actors are named and outlive this process, and
``strata down`` finds them by name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.config import ServiceConfig
from cluster.workers import actor_options, create_worker
from proto.vocab import Role

logger = logging.getLogger(__name__)

ROUTER_NAME = "strata-router"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What every Ray process of the service gets in its environment (``ray start`` too): the
    repository root first on ``PYTHONPATH`` (Ray starts workers without it), then the user's
    own entries, kept in their order."""
    env = os.environ if environ is None else environ
    user = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != _ROOT]
    return {"PYTHONPATH": os.pathsep.join([_ROOT, *user])}


@dataclass
class Service:
    address: str  # host:port of the gRPC API
    router: Any  # Ray actor handle
    prefill: list[Any] = field(default_factory=list)
    decode: list[Any] = field(default_factory=list)
    owns_ray: bool = False  # this process started the Ray cluster (and stops it)
    http_address: str | None = None  # host:port of the OpenAI-compatible HTTP API, if on
    metrics_address: str | None = None  # host:port of Prometheus /metrics, if on

    def shutdown(self) -> None:
        shutdown_actors(self.router, self.prefill + self.decode)
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()


def connect(address: str | None, cfg: ServiceConfig, local: bool = False) -> bool:
    """Join the cluster at ``address`` (``local``: the loopback head of ``strata up
    --detach``), or start an embedded one of this process's own (never a Ray cluster that
    already runs on this machine); True if this process owns it."""
    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": worker_env()}
    if address:
        ray.init(
            address=address,
            namespace=cfg.namespace,
            runtime_env=runtime_env,
            logging_level=logging.WARNING,
            **({"_node_ip_address": "127.0.0.1"} if local else {}),
        )
        return False
    from cluster.quiet import use_local_ray

    use_local_ray()
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        namespace=cfg.namespace,
        runtime_env=runtime_env,
        include_dashboard=False,
        resources={"prefill": float(max(cfg.num_prefill, 1)), "decode": float(cfg.num_decode)},
        num_cpus=max(2, os.cpu_count() or 2),
        object_store_memory=256 << 20,
        logging_level=logging.WARNING,
        _system_config={"worker_register_timeout_seconds": 120},
    )
    return True


def launch(
    cfg: ServiceConfig, address: str | None = None, detach: bool = False, local: bool = False
) -> Service:
    """Start the service's actors. ``local``: the cluster at ``address`` is this machine's
    loopback head (workers then listen on 127.0.0.1 only, as in an embedded cluster)."""
    from cluster.router_actor import RouterActor

    owns = connect(address, cfg)
    bind_all = bool(address) and not local
    prefill = [
        create_worker(cfg, Role.PREFILL, i, bind_all, detach) for i in range(cfg.num_prefill)
    ]
    decode = [create_worker(cfg, Role.DECODE, i, bind_all, detach) for i in range(cfg.num_decode)]
    workers = [(Role.PREFILL, h) for h in prefill] + [(Role.DECODE, h) for h in decode]
    # The router runs on this node (the head, where `strata up` runs): its gRPC address is the
    # one users are given, and a worker node that leaves must not take the router with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    router = (
        ray.remote(RouterActor)
        .options(**actor_options(ROUTER_NAME, detach), scheduling_strategy=here)
        .remote(workers, cfg, detach=detach)
    )
    try:
        grpc_address = ray.get(router.address_of.remote(), timeout=600)
        http_port = ray.get(router.http_port_of.remote(), timeout=60)
        metrics_port = ray.get(router.metrics_port_of.remote(), timeout=60)
    except Exception as e:
        shutdown_actors(router, prefill + decode)
        if owns:
            ray.shutdown()
        from cluster.errors import ClusterError

        raise ClusterError(f"the service did not start: {failure_line(e)}") from e
    host = grpc_address.rsplit(":", 1)[0]
    http = f"{host}:{http_port}" if http_port is not None else None
    metrics = f"{host}:{metrics_port}" if metrics_port is not None else None
    return Service(
        grpc_address,
        router,
        prefill,
        decode,
        owns_ray=owns,
        http_address=http,
        metrics_address=metrics,
    )


def shutdown_actors(router: Any, workers: list[Any]) -> None:
    for handle in [h for h in (router, *workers) if h is not None]:
        try:
            ray.get(handle.shutdown.remote(), timeout=30)
        except Exception:  # already dead is fine
            pass
        try:
            ray.kill(handle)
        except Exception:
            pass


def named_workers(namespace: str) -> list[dict[str, str]]:
    from ray.util import list_named_actors

    return [
        a
        for a in list_named_actors(all_namespaces=True)
        if isinstance(a, dict)
        and a.get("namespace") == namespace
        and a.get("name", "").startswith("strata-")
        and a.get("name") != ROUTER_NAME
    ]


def failure_line(e: BaseException) -> str:
    """The last line of what a Ray failure says (its cause), for a one-line error."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
