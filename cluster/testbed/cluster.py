"""A Strata cluster of separate test hosts on this machine, started the way users start one.

    with HostCluster(TestbedConfig(), root="/tmp/tb") as tb:
        tb.start_ray()                    # `ray start --head` on head, `ray start --address`
                                          # with role resources on every worker host
        address = tb.up(SERVICE_YAML)     # `strata up --address auto ...` on the head
        tb.agent(CLIENT).call("generate", address=address, ...)   # from the client host

Hosts: ``head`` (the Ray head and the router, no workers), one host per ``HostSpec`` (its
``prefill`` / ``decode`` resource units; a host offering both runs a prefill and a decode
worker side by side, the one case where the KV may travel through shared memory), and
``client`` (no Ray: requests come from there over the bridge). Addresses are ``SUBNET.1`` for
the head, ``SUBNET.11`` on for the worker hosts and ``SUBNET.100`` for the client, a /24 that
exists only on the bridge; no host has a route anywhere else.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from cluster.quiet import SERVING_RAY_ENV
from cluster.testbed.agent import Agent
from cluster.testbed.host import ROOT, Host, Lan, TestbedError

HEAD, CLIENT = "head", "client"


@dataclass(frozen=True)
class HostSpec:
    name: str
    prefill: int = 0  # units of the `prefill` resource the host offers (workers it takes)
    decode: int = 0


@dataclass(frozen=True)
class TestbedConfig:
    # Worker hosts; the default puts prefill-x and decode-y side by side on host-a.
    workers: tuple[HostSpec, ...] = field(default_factory=lambda: (
        HostSpec("host-a", prefill=1, decode=1),
        HostSpec("host-b", prefill=1),
        HostSpec("host-c", decode=1),
    ))
    subnet: str = "10.77.0"  # the bridge's /24 (first three octets); nothing else uses it
    ray_port: int = 6379
    cpus_per_host: int = 1  # what each host tells Ray (its workers share it)
    object_store_bytes: int = 80 << 20  # Ray's object store of each host (in its /dev/shm)
    shm_bytes: int = 1 << 30  # each host's /dev/shm (a tmpfs: pages used, not reserved)

    def __post_init__(self) -> None:
        parts = self.subnet.split(".")
        if len(parts) != 3 or not all(p.isdigit() and 0 <= int(p) < 256 for p in parts):
            raise ValueError(f"subnet must be three octets like '10.77.0', got {self.subnet!r}")
        names = [h.name for h in self.workers]
        if len(set(names)) != len(names) or {HEAD, CLIENT} & set(names):
            raise ValueError(f"worker host names must be unique and not {HEAD!r}/{CLIENT!r}")
        if not 1 <= len(self.workers) <= 80:
            raise ValueError("between 1 and 80 worker hosts")


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


class HostCluster:
    def __init__(self, config: TestbedConfig, root: str) -> None:
        self.config = config
        self.root = root
        # Ray's own token authentication on, one token for the cluster's nodes and drivers
        # (as across machines; left unset, Ray turns it on or off by what ~/.ray holds).
        self.env = {**SERVING_RAY_ENV, **os.environ, "PYTHONPATH": ROOT,
                    "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.hosts: dict[str, Host] = {}
        self.specs = {h.name: h for h in config.workers}
        self._agents: dict[str, Agent] = {}
        self.lan: Lan | None = None
        try:
            self.lan = Lan()
            addresses = {HEAD: 1, **{h.name: 11 + i for i, h in enumerate(config.workers)},
                         CLIENT: 100}
            for name, last in addresses.items():
                host = Host(name, f"{config.subnet}.{last}", os.path.join(root, name),
                            config.shm_bytes)
                self.hosts[name] = host
                self.lan.plug(host)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> HostCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def head_address(self) -> str:
        return f"{self.hosts[HEAD].address}:{self.config.ray_port}"

    def host_of_ip(self, ip: str) -> str:
        return next(name for name, h in self.hosts.items() if h.address == ip)

    # ---- Ray -----------------------------------------------------------------------------
    def _ray_start_cmd(self, name: str) -> list[str]:
        host = self.hosts[name]
        cmd = [_bin("ray"), "start", f"--node-ip-address={host.address}",
               f"--num-cpus={self.config.cpus_per_host}",
               f"--object-store-memory={self.config.object_store_bytes}",
               "--disable-usage-stats"]
        if name == HEAD:
            return [*cmd, "--head", f"--port={self.config.ray_port}",
                    "--include-dashboard=false"]
        spec = self.specs[name]
        res = {k: v for k, v in (("prefill", spec.prefill), ("decode", spec.decode)) if v}
        return [*cmd, f"--address={self.head_address}", f"--resources={json.dumps(res)}"]

    def start_ray(self, timeout: float = 300.0) -> None:
        """``ray start --head`` on the head, then ``ray start --address`` on each worker host,
        as the README says."""
        for name in (HEAD, *self.specs):
            self.ray_start(name, timeout)

    def ray_start(self, name: str, timeout: float = 300.0, tries: int = 2) -> None:
        """``ray start`` on one host (again after ``reboot``). Ray gives a node 30 s to register
        with its head; on a loaded machine that can pass: the host's Ray is stopped and started
        once more."""
        for attempt in range(tries):
            proc = self.hosts[name].run(self._ray_start_cmd(name), timeout=timeout, env=self.env,
                                        check=False)
            if proc.returncode == 0:
                return
            if attempt + 1 < tries:
                self.hosts[name].run([_bin("ray"), "stop", "--force"], timeout=timeout,
                                     env=self.env, check=False)
        out = (proc.stdout + proc.stderr).strip().splitlines()
        raise TestbedError(f"`ray start` on {name} failed: {out[-1] if out else ''}")

    def reboot(self, name: str) -> None:
        """Every process of ``name`` killed at once (its namespaces, disk and address kept);
        ``ray start`` it again with ``ray_start``."""
        agent = self._agents.pop(name, None)
        if agent is not None:
            agent.close()
        self.hosts[name].kill_all()

    # ---- the service ---------------------------------------------------------------------
    def up(self, service_yaml: str, *flags: str, timeout: float = 600.0) -> dict[str, str]:
        """``strata up --address auto --config FILE --detach FLAGS`` on the head; the addresses
        it printed: ``grpc`` and, with an HTTP port, ``http``."""
        path = self.hosts[HEAD].write_tmp("service.yaml", service_yaml)
        proc = self.hosts[HEAD].run(
            [_bin("strata"), "up", "--address", "auto", "--config", path, "--detach", *flags],
            timeout=timeout, env=self.env, check=False)
        if proc.returncode != 0:
            raise TestbedError(f"strata up failed: {proc.stderr[-3000:]}")
        out: dict[str, str] = {}
        for line in proc.stdout.splitlines():
            if "serving gRPC on" in line:
                out["grpc"] = line.split("serving gRPC on", 1)[1].split()[0]
            elif "HTTP API on http://" in line:
                out["http"] = line.split("http://", 1)[1].split("/")[0]
        if "grpc" not in out:
            raise TestbedError(f"strata up printed no address: {proc.stdout}")
        return out

    def agent(self, name: str) -> Agent:
        """The helper process on host ``name`` (started on first use)."""
        if name not in self._agents:
            self._agents[name] = Agent(self.hosts[name],
                                       os.path.join(self.hosts[name].root, "agent.log"),
                                       self.env)
        return self._agents[name]

    def strata(self, name: str, *args: str, timeout: float = 600.0
               ) -> subprocess.CompletedProcess:
        """The ``strata`` command on host ``name``."""
        return self.hosts[name].run([_bin("strata"), *args], timeout=timeout, check=False,
                                    env=self.env)

    # ---- links ---------------------------------------------------------------------------
    def set_link(self, name: str, up: bool) -> None:
        assert self.lan is not None
        self.lan.set_link(name, up)

    def partition(self, a: list[str], b: list[str], on: bool) -> None:
        """Hosts of ``a`` cannot reach hosts of ``b`` (both still reach every other host);
        ``on=False`` heals it. Made with isolated bridge ports, so each side needs no host
        within it (``a`` and ``b`` are one host each, or hosts that may not talk anyway)."""
        assert self.lan is not None
        self.lan.set_isolated([*a, *b], on)

    def wait_until(self, what: str, fn: Any, timeout: float, every: float = 0.5
                   ) -> float:
        """Poll ``fn()`` until true; the seconds it took. TestbedError after ``timeout``."""
        t0 = time.monotonic()
        while True:
            try:
                if fn():
                    return time.monotonic() - t0
            except TestbedError:
                pass
            if time.monotonic() - t0 > timeout:
                raise TestbedError(f"{what}: not within {timeout:.0f} s")
            time.sleep(every)

    def close(self) -> None:
        for agent in self._agents.values():
            try:
                agent.close()
            except Exception:  # the hosts go next anyway
                pass
        self._agents.clear()
        for host in self.hosts.values():
            host.close()
        if self.lan is not None:
            self.lan.close()
