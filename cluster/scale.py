"""``strata scale --prefill N --decode M``: change the worker counts of a running service.

New workers start on nodes that offer their role's resource (they load the model and measure
themselves first), then the router takes them in. Workers to remove are the highest-numbered of
their role: the router stops placing requests on them, waits for their running requests to end
(``--drain-timeout``), drops them, and they are stopped. New workers are detached actors (they
outlive this command); ``strata down`` stops them with the rest.
"""

from __future__ import annotations

import argparse
import logging
import re
from typing import Any

import ray

from cluster.errors import ClusterError, UsageError
from cluster.launcher import ROUTER_NAME, failure_line, shutdown_actors
from cluster.workers import create_worker
from proto.vocab import Role

logger = logging.getLogger(__name__)


def scale(
    router: Any,
    targets: dict[str, int | None],
    drain_timeout_s: float = 60.0,
    start_timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Bring each role's worker count to ``targets[role]``; returns what was added and removed.
    ClusterError, before anything starts, when the cluster lacks the role resources the new
    workers need; new workers not ready within ``start_timeout_s`` are stopped again."""
    cfg, _ = ray.get(router.service_config.remote(), timeout=60)
    workers = ray.get(router.workers.remote(), timeout=60)
    live = [w for w in workers if w["state"] != "gone"]
    bind_all = any(not str(w["kv_address"]).startswith("127.0.0.1") for w in live)
    for role in (Role.PREFILL, Role.DECODE):
        target = targets.get(role)
        if target is not None and (target < 0 or (role == Role.DECODE and target < 1)):
            raise UsageError(f"--{role} must be >= {1 if role == Role.DECODE else 0}, got {target}")
    mine = {
        role: sorted((w for w in live if w["role"] == role), key=lambda w: _index(w["worker_id"]))
        for role in (Role.PREFILL, Role.DECODE)
    }
    check_resources({r: t - len(mine[r]) for r, t in targets.items() if t is not None})
    added: list[str] = []
    removed: list[str] = []
    for role in (Role.PREFILL, Role.DECODE):
        target = targets.get(role)
        if target is None:
            continue
        have = mine[role]
        if target > len(have):
            used = {_index(w["worker_id"]) for w in have}
            free = [i for i in range(target + len(used)) if i not in used][: target - len(have)]
            handles = [create_worker(cfg, role, i, bind_all, detach=True) for i in free]
            try:
                added += ray.get(
                    router.add_workers.remote([(role, h) for h in handles]),
                    timeout=start_timeout_s,
                )
            except Exception as e:
                shutdown_actors(None, handles)
                raise ClusterError(
                    f"new {role} workers did not start within {start_timeout_s:.0f} s and were "
                    f"stopped: {failure_line(e)}"
                ) from e
        elif target < len(have):
            ids = [w["worker_id"] for w in have[target:]]
            handles = ray.get(router.retire_workers.remote(ids, drain_timeout_s), timeout=None)
            shutdown_actors(None, handles)
            removed += ids
    return {"added": added, "removed": removed}


def check_resources(wanted: dict[str, int]) -> None:
    """Each role that gains workers has that many free units of its resource, when the cluster
    places that role by resource (ClusterError naming the missing one otherwise)."""
    total = ray.cluster_resources()
    free = ray.available_resources()
    for role, more in wanted.items():
        if more <= 0 or total.get(role, 0) < 1:
            continue
        have = int(free.get(role, 0))
        if have < more:
            raise ClusterError(
                f"the cluster has {have} free {role!r} resource units for {more} more {role} "
                f"workers ({int(total[role])} in all): add a node that offers them (`ray start "
                f"--address HEAD:6379 --resources '{{\"{role}\": {more}}}'`) first"
            )


def _index(worker_id: str) -> int:
    m = re.search(r"-(\d+)$", worker_id)
    return int(m.group(1)) if m else 0


def run_scale(args: argparse.Namespace) -> int:
    from cluster.lifecycle import connect, resolve_address

    if args.prefill is None and args.decode is None:
        raise UsageError("give --prefill N and/or --decode M")
    address = resolve_address(args.address)
    if address is None:
        raise ClusterError(
            "no detached service runs on this machine (start one with `strata up --detach`, "
            "or give the Ray cluster with --address)"
        )
    connect(address, args.namespace)
    try:
        try:
            router = ray.get_actor(ROUTER_NAME)
        except ValueError:
            raise ClusterError(
                f"no Strata service in Ray namespace {args.namespace!r} (start one with "
                "`strata up --detach`)"
            ) from None
        targets = {Role.PREFILL: args.prefill, Role.DECODE: args.decode}
        res = scale(router, targets, args.drain_timeout, args.start_timeout)
        workers = ray.get(router.workers.remote(), timeout=60)
    finally:
        ray.shutdown()
    counts = {r: sum(1 for w in workers if w["role"] == r and w["state"] != "gone")
              for r in (Role.PREFILL, Role.DECODE)}
    print(f"strata: added {res['added'] or 'none'}, removed {res['removed'] or 'none'}; "
          f"now {counts[Role.PREFILL]} prefill + {counts[Role.DECODE]} decode workers")
    return 0
