"""``strata bench soak --hosts N``: the chaos soak on N separate test hosts (``cluster/testbed``),
with link faults beside the process kills.

The hosts: a head (Ray head, router), N worker hosts taking turns offering ``prefill`` and
``decode`` (so ``ceil(N/2)`` prefill and ``floor(N/2)`` decode workers, one a host), and a client
host. This process builds them (root: network and mount namespaces), starts Ray and the service
the way the README says, then moves its own network into the client host's namespace, so the
soak's client threads reach the router over the bridge like any client on another machine.

The faults: the cable of the last decode host pulled for 10 s (a quarter into each run), the
plain soak's kills at their phases (a third in; SIGKILL by pid on the worker's host; the
``restart`` phase is left out), then a 10 s partition between the first prefill and the last
decode host (0.6 in). A link fault is over when every worker is up again.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cluster.testbed.cluster import CLIENT, HEAD, HostCluster, HostSpec, TestbedConfig

TOKEN = "soak-token"
LINK_FAULT_S = 10.0
_CLONE_NEWNET = 0x40000000


def hosts_config(n: int) -> TestbedConfig:
    if n < 2:
        raise ValueError("--hosts needs at least 2 worker hosts (a prefill and a decode host)")
    return TestbedConfig(workers=tuple(
        HostSpec(f"host-{i}", prefill=int(i % 2 == 0), decode=int(i % 2 == 1))
        for i in range(n)))


def service_yaml(args: argparse.Namespace, num_prefill: int, num_decode: int) -> str:
    return (
        f"num_prefill: {num_prefill}\nnum_decode: {num_decode}\nsecret: soak-secret\n"
        f"engine: {{model: {args.model}, dtype: {args.dtype}, kv_cache_bytes: 16M,"
        " max_model_len: 4096, max_num_batched_tokens: 512}\n"
        # a disk tier of a few MiB under each host's own /tmp: full most of the run
        "store: {host_capacity_bytes: 8M, disk_path: /tmp/strata-kv, disk_capacity_bytes: 4M}\n"
        f"router: {{host: 0.0.0.0, port: 50051, auth_token: {TOKEN}}}\n"
    )


def _join_network_of(pid: int) -> None:
    """This process's network becomes that of process ``pid`` (threads started later too)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns into the client host's network failed")
    finally:
        os.close(fd)


class HostFaults:
    """The link faults of a soak on test hosts, and its kills. ``start(name)`` begins fault
    ``name`` (``link:HOST``: the host's cable out for 10 s; ``partition:A:B``: A and B cut apart
    for 10 s); ``poll()`` records when every worker is up again after it. ``kill_worker`` is the
    soak's kill (``soak_faults.Faults``): a worker's pid is one of its host's processes."""

    def __init__(self, tb: HostCluster) -> None:
        self.tb = tb
        self.began: dict[str, float] = {}  # fault -> monotonic time it began
        self.back: dict[str, float] = {}  # fault -> monotonic time every worker was back
        self._healed: dict[str, float] = {}  # fault -> time the link came back

    def _workers(self) -> dict[str, dict[str, Any]]:
        ws = self.tb.agent(HEAD).call("router_call", method="workers", args=[], call_timeout=30)
        return {w["worker_id"]: w for w in ws}

    def plan(self, seconds: float) -> list[tuple[float, str]]:
        """The link faults of a run of ``seconds``: a decode host's cable a quarter in, a
        partition between the first prefill and that decode host at 0.6."""
        names = [h.name for h in self.tb.config.workers]
        prefill_host = names[0]
        decode_host = names[-1] if len(names) % 2 == 0 else names[-2]
        return [(seconds * 0.25, f"link:{decode_host}"),
                (seconds * 0.6, f"partition:{prefill_host}:{decode_host}")]

    def start(self, name: str) -> None:
        kind, _, rest = name.partition(":")
        if kind == "link":
            self.tb.set_link(rest, False)
            self._end_later(name, lambda: self.tb.set_link(rest, True))
        elif kind == "partition":
            a, b = rest.split(":")
            self.tb.partition([a], [b], True)
            self._end_later(name, lambda: self.tb.partition([a], [b], False))
        else:
            raise ValueError(f"unknown link fault {name!r}")
        self.began[name] = time.monotonic()

    def kill_worker(self, worker: str, pid: int) -> None:
        """SIGKILL process ``pid`` (as its host numbers it) on the host of ``worker``."""
        w = self._workers()[worker]
        host = self.tb.hosts[self.tb.host_of_ip(w["kv_address"].rsplit(":", 1)[0])]
        host.run(["kill", "-KILL", str(pid)])

    def _end_later(self, name: str, end: Any) -> None:
        def run() -> None:
            end()
            self._healed[name] = time.monotonic()

        threading.Timer(LINK_FAULT_S, run).start()

    def poll(self) -> None:
        pending = [f for f in self._healed if f not in self.back]
        if not pending:
            return
        try:
            ws = self._workers()
        except Exception:  # asked again on the next poll
            return
        if all(w["state"] == "up" for w in ws.values()):
            for f in pending:
                self.back[f] = time.monotonic()

    def all_back(self) -> bool:
        return all(f in self.back for f in self.began)

    def summary(self, t_start: float) -> list[dict[str, Any]]:
        """Each fault: when it began (seconds into the run) and how long after it began every
        worker was up again (None: not within the run's wait)."""
        return [{"fault": f, "t": t - t_start,
                 "back_after_s": self.back[f] - t if f in self.back else None}
                for f, t in self.began.items()]  # fmt: skip


@contextmanager
def hosts_service(args: argparse.Namespace) -> Iterator[tuple[str, HostFaults]]:
    """The service on ``args.hosts`` test hosts; yields its address (reached from this process,
    now in the client host's network) and the fault driver. Everything goes on exit."""
    cfg = hosts_config(args.hosts)
    num_prefill = sum(h.prefill for h in cfg.workers)
    num_decode = sum(h.decode for h in cfg.workers)
    args.prefill, args.decode, args.token = num_prefill, num_decode, TOKEN
    with tempfile.TemporaryDirectory(prefix="strata-soak-hosts-") as root:
        with HostCluster(cfg, root) as tb:
            tb.start_ray()
            address = tb.up(service_yaml(args, num_prefill, num_decode))["grpc"]
            tb.agent(HEAD)  # its reader thread starts before the move (it only reads a pipe)
            _join_network_of(tb.hosts[CLIENT].pid)
            yield address, HostFaults(tb)
