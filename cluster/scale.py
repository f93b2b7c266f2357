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
import sys
from typing import Any

import ray

from cluster.launcher import ROUTER_NAME, shutdown_actors
from cluster.workers import create_worker
from proto.worker_api import DECODE, PREFILL

logger = logging.getLogger(__name__)


def scale(router: Any, targets: dict[str, int], drain_timeout_s: float = 60.0) -> dict[str, Any]:  # noqa: ANN401
    """Bring each role's worker count to ``targets[role]``; returns what was added and removed."""
    cfg, _ = ray.get(router.service_config.remote(), timeout=60)
    workers = ray.get(router.workers.remote(), timeout=60)
    live = [w for w in workers if w["state"] != "gone"]
    bind_all = any(not str(w["kv_address"]).startswith("127.0.0.1") for w in live)
    added: list[str] = []
    removed: list[str] = []
    for role in (PREFILL, DECODE):
        target = targets.get(role)
        if target is None:
            continue
        if target < 0 or (role == DECODE and target < 1):
            raise ValueError(f"--{role} must be >= {1 if role == DECODE else 0}, got {target}")
        mine = sorted((w for w in live if w["role"] == role), key=lambda w: _index(w["worker_id"]))
        if target > len(mine):
            used = {_index(w["worker_id"]) for w in mine}
            free = [i for i in range(target + len(used)) if i not in used][: target - len(mine)]
            handles = [create_worker(cfg, role, i, bind_all, detach=True) for i in free]
            added += ray.get(
                router.add_workers.remote([(role, h) for h in handles]), timeout=900
            )
        elif target < len(mine):
            ids = [w["worker_id"] for w in mine[target:]]
            handles = ray.get(router.retire_workers.remote(ids, drain_timeout_s), timeout=None)
            shutdown_actors(None, handles)
            removed += ids
    return {"added": added, "removed": removed}


def _index(worker_id: str) -> int:
    m = re.search(r"-(\d+)$", worker_id)
    return int(m.group(1)) if m else 0


def run_scale(args: argparse.Namespace) -> int:
    if args.prefill is None and args.decode is None:
        print("error: give --prefill N and/or --decode M", file=sys.stderr)
        return 2
    ray.init(address=args.address or "auto", namespace=args.namespace,
             logging_level=logging.WARNING)
    try:
        try:
            router = ray.get_actor(ROUTER_NAME)
        except ValueError:
            print(f"error: no Strata service in Ray namespace {args.namespace!r} "
                  "(start one with `strata up`)", file=sys.stderr)
            return 2
        try:
            res = scale(router, {PREFILL: args.prefill, DECODE: args.decode}, args.drain_timeout)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        workers = ray.get(router.workers.remote(), timeout=60)
    finally:
        ray.shutdown()
    counts = {r: sum(1 for w in workers if w["role"] == r and w["state"] != "gone")
              for r in (PREFILL, DECODE)}
    print(f"strata: added {res['added'] or 'none'}, removed {res['removed'] or 'none'}; "
          f"now {counts[PREFILL]} prefill + {counts[DECODE]} decode workers")
    return 0
