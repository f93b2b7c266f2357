"""Test hosts on one machine: each its own Linux namespaces, all on one bridge.

A ``Host`` is a process tree of its own: ``unshare`` starts ``hostinit`` as PID 1 of fresh
network, mount, UTS, IPC and PID namespaces (own ``/dev/shm``, own ``/tmp`` on disk, own
hostname, own loopback); every command of the host runs there through ``nsenter``. The ``Lan``
is one more network namespace holding the bridge: each host's ``eth0`` is one end of a veth pair
whose other end is a port of that bridge. Faults are made on the bridge side: a port taken down
is a cable pulled (the host sees no carrier, every packet is dropped silently); two isolated
ports cannot reach each other but still reach the rest (a partition).

Nothing is named or left in the caller's namespaces (no ``ip netns`` entries, no bridge or veth
in the caller's network): every ``unshare`` dies with the process that started it (parent-death
signal), its namespace's processes die with its PID 1, and a network namespace goes with its
last process, taking its veth ends (and so their peers) with it. A test that crashes, or is
killed, leaves nothing to clean up. Needs root (``CAP_SYS_ADMIN``, ``CAP_NET_ADMIN``) and the
``unshare``, ``nsenter``, ``ip`` and ``bridge`` programs (util-linux, iproute2).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PR_SET_PDEATHSIG = 1
_TOOLS = ("unshare", "nsenter", "ip", "bridge")


class TestbedError(RuntimeError):
    """The namespaces, links or processes of the test hosts could not be made or reached."""


def unavailable() -> str | None:
    """Why test hosts cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "test hosts need root (network and mount namespaces)"
    missing = [t for t in _TOOLS if shutil.which(t) is None]
    if missing:
        return f"test hosts need {', '.join(missing)} (util-linux, iproute2)"
    return None


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _child_of(pid: int, timeout: float) -> int:
    """The (first) child process of ``pid``: the PID 1 that ``unshare --fork`` started."""
    end = time.monotonic() + timeout
    path = f"/proc/{pid}/task/{pid}/children"
    while time.monotonic() < end:
        try:
            with open(path) as f:
                kids = f.read().split()
        except OSError:
            kids = []
        if kids:
            return int(kids[0])
        time.sleep(0.02)
    raise TestbedError(f"unshare (pid {pid}) started no process within {timeout} s")


def _wait_gone(pid: int, timeout: float) -> None:
    """Until process ``pid`` has ended (a zombie has: it only waits to be reaped)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except OSError:
            return
        time.sleep(0.02)
    raise TestbedError(f"process {pid} still runs {timeout} s after its parent was killed")


def _unshare(flags: Sequence[str], cmd: Sequence[str], stdout: int | None) -> subprocess.Popen:
    return subprocess.Popen(
        ["unshare", *flags, "--fork", "--kill-child", *cmd],
        stdout=stdout,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        preexec_fn=_die_with_parent,  # only a prctl, before exec
        start_new_session=True,  # a Ctrl-C of the caller's terminal is the caller's to handle
    )


def _check(proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise TestbedError(f"{what} failed ({proc.returncode}): {(proc.stderr or '').strip()}")
    return proc


class Host:
    """One test host: ``name`` (its hostname), ``address`` on the bridge, ``root`` its own
    directory on disk (its ``/tmp``)."""

    def __init__(self, name: str, address: str, root: str, shm_bytes: int = 1 << 30) -> None:
        self.name = name
        self.address = address
        self.root = root
        self.tmp = os.path.join(root, "tmp")  # the host's /tmp, seen from outside
        os.makedirs(root, exist_ok=True)
        self.pid = 0  # PID 1 of the host, seen from outside (once it runs)
        self._unshare = _unshare(
            ["--net", "--mount", "--uts", "--ipc", "--pid", "--mount-proc",
             "--propagation", "private"],
            [sys.executable, "-m", "cluster.testbed.hostinit", "--hostname", name,
             "--address", address, "--root", root, "--shm-bytes", str(shm_bytes),
             "--keep", ROOT, "--keep", sys.prefix, "--keep", sys.base_prefix],
            stdout=subprocess.PIPE,
        )
        assert self._unshare.stdout is not None
        line = self._unshare.stdout.readline().decode().strip()
        if line != "ready":
            self.close()
            raise TestbedError(f"host {name} did not start (its init said {line!r})")
        self.pid = _child_of(self._unshare.pid, 10.0)

    def write_tmp(self, name: str, text: str) -> str:
        """A file in the host's ``/tmp``; its path inside the host."""
        with open(os.path.join(self.tmp, name), "w") as f:
            f.write(text)
        return f"/tmp/{name}"

    @property
    def alive(self) -> bool:
        return self._unshare.poll() is None

    def command(self, cmd: Sequence[str], cwd: str = ROOT) -> list[str]:
        """``cmd`` as it runs inside this host."""
        return ["nsenter", "-t", str(self.pid), "-n", "-m", "-u", "-i", "-p", f"--wd={cwd}",
                "--", *cmd]

    def run(self, cmd: Sequence[str], timeout: float = 120.0, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` in this host to its end; its output as text."""
        proc = subprocess.run(self.command(cmd), capture_output=True, text=True, timeout=timeout,
                              env=env, stdin=subprocess.DEVNULL)
        return _check(proc, f"`{' '.join(cmd)}` on {self.name}") if check else proc

    def spawn(self, cmd: Sequence[str], stdin: int | None = None, stdout: int | IO | None = None,
              stderr: int | IO | None = None, env: dict[str, str] | None = None
              ) -> subprocess.Popen:
        """Start ``cmd`` in this host (it dies with the host)."""
        return subprocess.Popen(self.command(cmd), stdin=stdin, stdout=stdout, stderr=stderr,
                                env=env)

    def kill_all(self) -> None:
        """Every process of the host but its PID 1, killed at once (a power cut, the
        namespaces kept). ``/dev/shm`` is emptied as a reboot would; the disk is kept."""
        self.run(["kill", "-KILL", "-1"], check=False)
        self.run(["sh", "-c", "rm -rf /dev/shm/* /dev/shm/.[!.]* 2>/dev/null; true"], check=False)

    def close(self) -> None:
        """The host and every process in it, gone."""
        if self._unshare.poll() is None:
            self._unshare.kill()
        self._unshare.wait(timeout=30)
        if self._unshare.stdout is not None:
            self._unshare.stdout.close()
        if self.pid:
            _wait_gone(self.pid, 30.0)  # PID 1 goes by its parent-death signal, just after


class Lan:
    """The bridge every host is plugged into, in a network namespace of its own."""

    BRIDGE = "br0"

    def __init__(self, prefix_len: int = 24) -> None:
        self.prefix_len = prefix_len
        self._unshare = _unshare(["--net"], ["sleep", "infinity"], stdout=None)
        self.pid = _child_of(self._unshare.pid, 10.0)
        self.ports: dict[str, str] = {}  # host name -> its bridge port
        self.ip("link", "add", self.BRIDGE, "type", "bridge")
        self.ip("link", "set", self.BRIDGE, "up")

    def _in_lan(self, cmd: Sequence[str]) -> subprocess.CompletedProcess:
        proc = subprocess.run(["nsenter", "-t", str(self.pid), "-n", "--", *cmd],
                              capture_output=True, text=True, timeout=30)
        return _check(proc, f"`{' '.join(cmd)}` on the bridge")

    def ip(self, *args: str) -> subprocess.CompletedProcess:
        return self._in_lan(["ip", *args])

    def plug(self, host: Host) -> None:
        """A veth pair: ``eth0`` in ``host`` with its address, the other end a bridge port."""
        port = f"p{len(self.ports)}-{host.name}"[:15]
        self.ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns",
                str(host.pid))
        self.ip("link", "set", port, "master", self.BRIDGE)
        self.ip("link", "set", port, "up")
        host.run(["ip", "addr", "add", f"{host.address}/{self.prefix_len}", "dev", "eth0"])
        host.run(["ip", "link", "set", "eth0", "up"])
        self.ports[host.name] = port

    def set_link(self, host: str, up: bool) -> None:
        """Take ``host``'s cable out (``up=False``) or put it back."""
        self.ip("link", "set", self.ports[host], "up" if up else "down")

    def set_isolated(self, hosts: Sequence[str], isolated: bool) -> None:
        """Isolated ports reach every port but each other (a partition between them)."""
        for h in hosts:
            self._in_lan(["bridge", "link", "set", "dev", self.ports[h], "isolated",
                          "on" if isolated else "off"])

    def close(self) -> None:
        if self._unshare.poll() is None:
            self._unshare.kill()
        self._unshare.wait(timeout=30)
        _wait_gone(self.pid, 30.0)
