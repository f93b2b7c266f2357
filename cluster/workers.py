"""Creating worker actors: one place for their Ray options, used at launch and by `strata scale`.

A worker asks Ray for one unit of its role's custom resource (``prefill`` or ``decode``) when the
cluster offers it, so a cluster can dedicate nodes to each role. Ray restarts a worker whose
process dies (``max_restarts=-1``): the new process loads the model again, reopens the same
LMDB directory (its disk tier is served again) and the router takes it back in. Calls in flight
when it died are not retried by Ray (``max_task_retries=0``): the router retries the request.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import ray

from cluster.config import ServiceConfig
from proto.vocab import Role
from worker.spec import WorkerSpec

logger = logging.getLogger(__name__)

WORKER_NAME_PREFIX = "strata-"


def role_resources(role: str) -> dict[str, float]:
    total = ray.cluster_resources()
    if total.get(role, 0) >= 1:
        return {role: 1.0}
    logger.warning("the cluster offers no %r resource: %s workers are placed anywhere", role, role)
    return {}


def engine_threads(cfg: ServiceConfig, role: str) -> int:
    """Torch intra-op threads for a worker of ``role``: ``engine.cpu_threads`` when the config
    sets it, else ``share_cores`` over the cluster's alive nodes."""
    if cfg.engine.cpu_threads:
        return cfg.engine.cpu_threads
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return share_cores(nodes, role, cfg.num_prefill + cfg.num_decode, os.cpu_count() or 1)


def share_cores(nodes: list[dict[str, float]], role: str, num_workers: int, local: int) -> int:
    """A node's CPUs shared among the workers it hosts. Two engines each running one thread per
    core on the same cores stall each other at every OpenMP barrier (measured on a 2-core node,
    1 prefill + 1 decode worker, batch 64: 447 decode tokens/s through the service with 2
    threads each, 954 with 1). A node that offers role resources hosts at most that many
    workers; without them the workers spread over the nodes (``nodes``: their Ray resources)."""
    role_nodes = [r for r in nodes if r.get(role, 0) >= 1]
    if role_nodes:
        shares = [
            int(r.get("CPU", local)) // max(1, int(r.get(Role.PREFILL, 0) + r.get(Role.DECODE, 0)))
            for r in role_nodes
        ]
        return max(1, min(shares))
    per_node = math.ceil(max(1, num_workers) / max(1, len(nodes)))
    cpus = min((int(r.get("CPU", local)) for r in nodes), default=local)
    return max(1, (cpus or local) // per_node)


def actor_options(name: str, detach: bool) -> dict[str, Any]:
    """Options every service actor shares (the router's too)."""
    opts: dict[str, Any] = {"max_concurrency": 256, "num_cpus": 0, "name": name}
    if detach:
        opts["lifetime"] = "detached"
    return opts


def create_worker(cfg: ServiceConfig, role: str, index: int, bind_all: bool, detach: bool) -> Any:
    """Start worker ``<role>-<index>`` (an actor handle; it is still loading when this returns).
    ``bind_all``: its gRPC server listens on every interface and advertises the node's address
    (a cluster of several machines); else 127.0.0.1."""
    from decode_worker.actor import decode_actor_class
    from prefill_worker.actor import prefill_actor_class

    if role not in (Role.PREFILL, Role.DECODE):
        raise ValueError(f"role must be {Role.PREFILL!r} or {Role.DECODE!r}, got {role!r}")
    wid = f"{role}-{index}"
    opts = {
        **actor_options(f"{WORKER_NAME_PREFIX}{wid}", detach),
        "resources": role_resources(role),
        "max_restarts": -1,
        "max_task_retries": 0,
    }
    spec = WorkerSpec(
        worker_id=wid,
        engine=dataclasses.replace(cfg.engine, cpu_threads=engine_threads(cfg, role)),
        store=cfg.store_for(wid),
        secret=cfg.secret,
        kv_host="0.0.0.0" if bind_all else "127.0.0.1",
        transfer=cfg.transfer,
    )
    actor_class = prefill_actor_class if role == Role.PREFILL else decode_actor_class
    return actor_class(**opts).remote(spec)
