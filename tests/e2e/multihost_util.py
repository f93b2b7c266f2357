"""The cluster of separate test hosts the multi-host tests share (``cluster/testbed``): its
service configuration, the module fixture's body, and helpers."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from cluster.testbed.cluster import CLIENT, HEAD, HostCluster, TestbedConfig
from cluster.testbed.host import unavailable

TOKEN = "multihost-token"
SECRET = "multihost-secret"
# What `strata up --config` gets on the head: every worker's LMDB under its own host's /tmp,
# the client API on every interface of the head (gRPC on 50051, HTTP on 8000), the same-host
# path left on (it must pick itself only where two workers share a host).
SERVICE_YAML = f"""\
num_prefill: 2
num_decode: 2
secret: {SECRET}
engine: {{model: tiny, kv_cache_bytes: 16M, max_model_len: 4096, max_num_batched_tokens: 256}}
store: {{host_capacity_bytes: 16M, disk_path: /tmp/strata-kv, disk_capacity_bytes: 256M}}
router: {{host: 0.0.0.0, port: 50051, http_port: 8000, auth_token: {TOKEN}}}
backend: {{transfer_timeout_s: 10}}
"""
FULL_ENV = "STRATA_MULTIHOST_FULL"  # 1: the fault tests too (several minutes on 2 cores)


@dataclass
class MultiHost:
    tb: HostCluster
    grpc: str  # host:port the router advertised
    http: str

    @property
    def client(self) -> Any:  # an Agent on the client host
        return self.tb.agent(CLIENT)

    @property
    def head(self) -> Any:  # an Agent (Ray driver) on the head host
        return self.tb.agent(HEAD)

    def generate(self, ids: list[int], max_tokens: int, request_id: str = "",
                 timeout: float = 120.0) -> dict[str, Any]:
        return self.client.call("generate", address=self.grpc, token=TOKEN,
                                ids=ids, max_tokens=max_tokens, request_id=request_id,
                                timeout=timeout, call_timeout=timeout + 30)

    def workers(self) -> dict[str, dict[str, Any]]:
        return {w["worker_id"]: w
                for w in self.head.call("router_call", method="workers", args=[])}

    def host_of(self, worker: dict[str, Any]) -> str:
        return self.tb.host_of_ip(worker["kv_address"].rsplit(":", 1)[0])

    def stats(self) -> dict[str, dict[str, float]]:
        return self.client.call("stats", address=self.grpc, token=TOKEN)

    def wait_no_leaks(self, within_s: float = 60.0) -> dict[str, bool]:
        end = time.monotonic() + within_s
        while True:
            res = self.head.call("router_call", method="check_no_leaks", args=[])
            if res and all(res.values()) or time.monotonic() > end:
                return res
            time.sleep(0.5)


def skip_reason() -> str | None:
    return unavailable()


def build(root: str, config: TestbedConfig | None = None) -> Iterator[MultiHost]:
    """The module fixture: hosts, Ray on them, the service; all of it gone afterwards, also
    when a test (or this set-up) fails."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    t0 = time.monotonic()
    with HostCluster(config or TestbedConfig(), root) as tb:
        tb.start_ray()
        t_ray = time.monotonic()
        addrs = tb.up(SERVICE_YAML)
        print(f"\ntest hosts: Ray on {len(tb.hosts) - 1} hosts in {t_ray - t0:.1f} s, "
              f"strata up in {time.monotonic() - t_ray:.1f} s; router at {addrs['grpc']}")
        yield MultiHost(tb, addrs["grpc"], addrs["http"])


def full_run() -> bool:
    return os.environ.get(FULL_ENV, "") not in ("", "0")
