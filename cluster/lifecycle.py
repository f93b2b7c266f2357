"""The life cycle of a detached service on one machine: the Ray head that ``strata up --detach``
starts, finding it again (``down``, ``scale``, a second ``up``) and stopping it.

``strata up --detach`` without ``--address`` starts a head bound to 127.0.0.1 (see
``cluster.quiet``) and records it in ``<tmp>/strata/head.json``; later commands find it there,
so they never attach by accident to another Ray cluster of this machine (a foreground
``strata up`` or ``strata demo`` runs its own embedded cluster). With ``--address`` (or
``STRATA_RAY_ADDRESS``) they join the cluster given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from cluster.errors import ClusterError, UsageError
from cluster.flags import ENV_RAY_ADDRESS, env
from cluster.quiet import LOCAL_RAY_ENV, SERVING_RAY_ENV, use_local_ray

HEAD_PORT = 6379


def state_file() -> str:
    return os.path.join(tempfile.gettempdir(), "strata", "head.json")


def ray_bin() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ray")


def read_head() -> dict[str, Any] | None:
    """The head ``strata up --detach`` recorded, if it still answers; a stale record is
    removed."""
    try:
        with open(state_file()) as f:
            head = json.load(f)
        host, port = str(head["gcs_address"]).rsplit(":", 1)
    except (OSError, ValueError, KeyError):
        return None
    if not _listening(host, int(port)):
        forget_head()
        return None
    return head


def record_head(**fields: Any) -> None:
    path = state_file()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    head = {**(read_head() or {}), **fields}
    with open(path + ".tmp", "w") as f:
        json.dump(head, f)
    os.replace(path + ".tmp", path)


def forget_head() -> None:
    try:
        os.unlink(state_file())
    except FileNotFoundError:
        pass


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def start_head(resources: dict[str, float]) -> tuple[str, bool]:
    """``ray start --head`` on 127.0.0.1 in the background, so detached actors outlive this
    process; returns its address and whether this call started it (else it ran already).
    ClusterError with Ray's own last line on failure; UsageError when another Ray holds the
    head port (join that one with ``--address``)."""
    head = read_head()
    if head is not None:
        use_local_ray()
        return str(head["gcs_address"]), False
    if _listening("127.0.0.1", HEAD_PORT):
        raise UsageError(
            f"port {HEAD_PORT} is taken (a Ray cluster this machine already runs?): join it "
            "with `strata up --address auto --detach`, or stop it with `ray stop`"
        )
    res = json.dumps({k: v for k, v in resources.items() if v > 0})
    cmd = [
        ray_bin(),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={HEAD_PORT}",
        "--include-dashboard=false",
        f"--resources={res}",
        "--disable-usage-stats",
    ]
    from cluster.launcher import worker_env

    environ = {**SERVING_RAY_ENV, **os.environ, **LOCAL_RAY_ENV, **worker_env()}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=environ)
    if proc.returncode != 0:
        lines = (proc.stdout + "\n" + proc.stderr).strip().splitlines()
        said = [ln for ln in lines if ln.strip() and " INFO " not in ln and "\tINFO " not in ln]
        raise ClusterError(
            f"`ray start --head` failed: {said[-1].strip() if said else proc.returncode}"
        )
    address = f"127.0.0.1:{HEAD_PORT}"
    use_local_ray()
    record_head(gcs_address=address, started=time.time())
    return address, True


# a Ray session directory's name: session_<date>_<time>_<microseconds>_<pid of its head>
_SESSION = re.compile(r"session_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d+_\d+")


def _own_processes() -> list[tuple[Any, str]]:
    """(process, command line) of this user's processes but this one."""
    import psutil

    out = []
    for proc in psutil.process_iter(["cmdline", "uids"]):
        try:
            if proc.pid != os.getpid() and proc.info["uids"].real == os.getuid():
                out.append((proc, " ".join(proc.info["cmdline"] or ())))
        except (psutil.Error, TypeError, AttributeError):
            continue
    return out


def _head_marks(address: str) -> tuple[str, str]:
    """What the command lines of the GCS at ``address`` and of its raylet carry."""
    return address, f"--gcs_server_port={address.rsplit(':', 1)[1]}"


def head_sessions(address: str, procs: list[tuple[Any, str]] | None = None) -> set[str]:
    """The Ray session directories (names) of the cluster whose GCS is at ``address``, found
    on the command lines of its GCS and raylet."""
    marks = _head_marks(address)
    procs = _own_processes() if procs is None else procs
    return {s for _, cmd in procs if any(m in cmd for m in marks) for s in _SESSION.findall(cmd)}


def head_processes(address: str) -> list[Any]:
    """The processes of the Ray cluster whose GCS is at ``address``, this user's only: those
    whose command line carries the address (or the GCS port flag), and every process that
    names the same session directory, and their children (the raylet's agents and workers,
    whose command lines Ray rewrites). Ray gives the monitors and the raylet the machine's
    network address even when the head was started on 127.0.0.1, so the address alone misses
    them."""
    import psutil

    marks = _head_marks(address)
    procs = _own_processes()
    sessions = head_sessions(address, procs)
    found = {p.pid: p for p, cmd in procs
             if any(m in cmd for m in marks) or any(s in cmd for s in sessions)}
    for proc in list(found.values()):
        try:
            found.update((c.pid, c) for c in proc.children(recursive=True) if c.pid != os.getpid())
        except psutil.Error:
            continue
    return list(found.values())


def stop_head(address: str | None = None) -> int:
    """Stop the loopback head ``strata up --detach`` started (every process of that cluster and
    of nothing else: other Ray clusters of the machine keep running) and forget it; returns
    how many processes were stopped."""
    import psutil

    address = address or str((read_head() or {}).get("gcs_address") or "")
    forget_head()
    if not address:
        return 0
    procs = head_processes(address)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


def resolve_address(address: str | None) -> str | None:
    """The Ray cluster a command that needs a running service joins: ``address`` (or
    ``STRATA_RAY_ADDRESS``), else the head ``strata up --detach`` started; None when there is
    none."""
    given = address or env(ENV_RAY_ADDRESS)
    if given:
        return given
    head = read_head()
    if head is None:
        return None
    use_local_ray()
    return str(head["gcs_address"])


def connect(address: str, namespace: str) -> None:
    """``ray.init`` against a running cluster; ClusterError when it does not answer."""
    import ray

    head = read_head()
    local = head is not None and head.get("gcs_address") == address
    try:
        ray.init(
            address=address,
            namespace=namespace,
            logging_level=logging.WARNING,
            log_to_driver=False,
            **({"_node_ip_address": "127.0.0.1"} if local else {}),
        )
    except (ConnectionError, RuntimeError) as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {e}") from None


def run_down(args: argparse.Namespace) -> int:
    """Stop the service's actors; with ``--stop-ray`` also the loopback head that ``strata up
    --detach`` started (never a cluster given with ``--address``)."""
    import ray

    from cluster.launcher import ROUTER_NAME, named_workers, shutdown_actors

    address = resolve_address(args.address)
    if address is None:
        print("strata: nothing to stop (no service started with `strata up --detach` runs here)")
        return 0
    connect(address, args.namespace)
    try:
        names = [ROUTER_NAME] + [a["name"] for a in named_workers(args.namespace)]
        found = 0
        for name in names:
            try:
                handle = ray.get_actor(name)
            except ValueError:
                continue
            found += 1
            shutdown_actors(handle, [])
    finally:
        ray.shutdown()
    if found:
        print(f"strata: stopped the service ({found} actors)")
    else:
        print(f"strata: nothing to stop (no Strata service in Ray namespace {args.namespace!r})")
    ours = read_head() if not (args.address or env(ENV_RAY_ADDRESS)) else None
    if args.stop_ray and ours is not None:
        stop_head(str(ours["gcs_address"]))
        print("strata: stopped its Ray head too")
    elif args.stop_ray:
        print("strata: the Ray cluster was not started by `strata up --detach`: it keeps running")
    elif ours is not None:
        print("strata: its Ray head still runs (`strata down --stop-ray` stops it)")
    return 0
