"""PID 1 of a test host (``python -m cluster.testbed.hostinit``), run by ``unshare`` in fresh
network, mount, UTS, IPC and PID namespaces.

It makes the host's own file system view first: a fresh tmpfs on ``/dev/shm``, the host's own
directory (on disk) over ``/tmp`` (the code and its Python stay visible), and an
``/etc/hosts`` naming only localhost and this host; then its hostname and its loopback. It
prints ``ready`` and from then on reaps every process that ends in the host (``ray start``
leaves daemons whose parent is gone: they become this process's children), so no zombie
keeps a pid that Ray or Strata would take for alive.

When it dies, the kernel kills every process of the host's PID namespace, and the network
namespace goes with its last process (its veth pair with it): nothing of the host is left.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def setup(hostname: str, address: str, root: str, shm_bytes: int, keep: list[str]) -> None:
    """``keep``: directories (the code, its Python) that must stay visible if they are under
    ``/tmp``: bound again at the same place inside the host's own ``/tmp``."""
    tmp = os.path.join(root, "tmp")
    os.makedirs(tmp, exist_ok=True)
    os.chmod(tmp, 0o1777)
    hosts = os.path.join(root, "hosts")
    with open(hosts, "w") as f:
        f.write(f"127.0.0.1 localhost\n::1 localhost ip6-localhost\n{address} {hostname}\n")
    _mount("--bind", hosts, "/etc/hosts")
    _mount("-t", "tmpfs", "-o", f"size={shm_bytes},mode=1777", "tmpfs", "/dev/shm")
    under_tmp = sorted({os.path.realpath(k) for k in keep
                        if os.path.realpath(k).startswith("/tmp/")})
    # bound into the host's /tmp directory while their paths still name them, then carried
    # onto /tmp with it (``mount`` resolves a /proc/<pid>/fd/N source to its path name, which
    # after /tmp is covered names the empty directory of the same name)
    for path in under_tmp:
        if any(path.startswith(k + "/") for k in under_tmp):
            continue  # inside another kept directory
        inside = os.path.join(tmp, os.path.relpath(path, "/tmp"))
        os.makedirs(inside, exist_ok=True)
        _mount("--bind", path, inside)
    _mount("--rbind", tmp, "/tmp")
    socket.sethostname(hostname)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def reap_forever() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        signal.sigtimedwait({signal.SIGCHLD}, 5.0)


def main() -> None:
    p = argparse.ArgumentParser(prog="hostinit")
    p.add_argument("--hostname", required=True)
    p.add_argument("--address", required=True)
    p.add_argument("--root", required=True, help="the host's own directory on disk")
    p.add_argument("--shm-bytes", type=int, default=1 << 30)
    p.add_argument("--keep", action="append", default=[], help="a directory to keep visible")
    args = p.parse_args()
    setup(args.hostname, args.address, args.root, args.shm_bytes, args.keep)
    print("ready", flush=True)
    reap_forever()


if __name__ == "__main__":
    main()
