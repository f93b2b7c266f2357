"""Ray's own chatter on the command line, turned down before Ray is imported.

Clusters that Strata starts itself (the embedded one of ``up``/``demo``/benchmarks, and the head
of ``up --detach`` without ``--address``) listen on 127.0.0.1 only, so they run without Ray's
token authentication: Ray then prints no token warning, and ``ray status`` works from any shell
against them. A cluster given with ``--address`` keeps the authentication its owner chose
(``RAY_AUTH_MODE`` is left as the user set it).

Ray starts its worker processes -- here the engines and the router, the whole service -- at
niceness 15 (its raylet's ``worker_niceness``), below every other process of the node: on a
small CPU node a benchmark client or any busy neighbour then takes the cores from the decode
step. Every raylet Strata starts (embedded, ``up --detach``, the test hosts) gets
``RAY_worker_niceness=0`` unless the environment sets it; nodes started by hand want the same.
"""

from __future__ import annotations

import os

LOCAL_RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",  # loopback-only clusters: see the module docstring
    "RAY_USAGE_STATS_ENABLED": "0",
}
SERVING_RAY_ENV = {"RAY_worker_niceness": "0"}  # the service's processes at the usual priority


def quiet_ray() -> None:
    """Defaults for every ``strata`` process (the user's own settings win)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def use_local_ray() -> None:
    """This process starts or joins a loopback cluster that Strata started."""
    for key, value in {**LOCAL_RAY_ENV, **SERVING_RAY_ENV}.items():
        os.environ.setdefault(key, value)
