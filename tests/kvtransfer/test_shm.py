"""The shared-memory segment: slots, generations (a slot reused under a reader is detected),
names that are refused, and stale segments of dead processes removed on start."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest

from kvtransfer import shm

pytestmark = pytest.mark.skipif(not shm.free_bytes(), reason="no writable /dev/shm")


@pytest.fixture
def segment():
    seg = shm.SlotSegment("test-shm", 4096, 3)
    yield seg
    seg.close()
    assert not os.path.exists(os.path.join(shm.SHM_DIR, seg.name))


def test_write_then_read_with_generation(segment: shm.SlotSegment) -> None:
    slot = segment.try_acquire()
    assert slot is not None
    view = segment.begin_write(slot, 1000)
    view[:] = bytes(range(250)) * 4
    gen = segment.end_write(slot)
    assert gen % 2 == 0 and gen > 0
    maps = shm.SegmentMap()
    try:
        assert maps.open(segment.name)
        out = np.empty(1000, dtype=np.uint8)
        maps.read_into(segment.name, segment.offset(slot), gen, out.data)
        assert out.tobytes() == bytes(range(250)) * 4
        # The writer starts over on the slot (it reused it): the old generation no longer reads.
        segment.begin_write(slot, 10)
        with pytest.raises(shm.TornReadError):
            maps.read_into(segment.name, segment.offset(slot), gen, out.data)
        gen2 = segment.end_write(slot)
        assert gen2 > gen
        with pytest.raises(shm.TornReadError):
            maps.read_into(segment.name, segment.offset(slot), gen, out.data)
        maps.read_into(segment.name, segment.offset(slot), gen2, out.data)
        with pytest.raises(ValueError, match="outside"):
            maps.read_into(segment.name, segment.offset(slot) + 100_000, gen2, out.data)
    finally:
        maps.close()


def test_slots_run_out_and_come_back(segment: shm.SlotSegment) -> None:
    got = [segment.try_acquire() for _ in range(3)]
    assert sorted(got) == [0, 1, 2]  # type: ignore[type-var]
    assert segment.try_acquire() is None
    assert segment.acquire(timeout=0.05) is None
    segment.release(1)
    assert segment.acquire(timeout=1) == 1


@pytest.mark.parametrize(
    "name", ["../etc/passwd", "strata-kv-x", "other-1-abc", "strata-kv-a/b-1-ff"]
)
def test_map_refuses_foreign_names(name: str) -> None:
    maps = shm.SegmentMap()
    assert not maps.open(name)
    assert not maps.open("strata-kv-nobody-1-deadbeef")  # well formed, but no such segment


def _make_and_die(conn) -> None:  # runs in a child process, which then exits
    seg = shm.SlotSegment("test-shm-crash", 4096, 1)
    conn.send(seg.name)  # synchronous: the name is out before the process dies
    os._exit(0)  # no clean-up: as if the worker had crashed


def test_stale_segments_of_a_dead_process_are_removed_on_start() -> None:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_make_and_die, args=(child,))
    p.start()
    assert parent.poll(30)
    name = parent.recv()
    p.join(30)
    path = os.path.join(shm.SHM_DIR, name)
    assert os.path.exists(path)  # the crash left it behind...
    seg = shm.SlotSegment("test-shm-crash", 4096, 1)  # ...the next start of that owner removes it
    try:
        assert not os.path.exists(path)
        assert os.path.exists(os.path.join(shm.SHM_DIR, seg.name))  # its own is live
        assert shm.remove_stale("test-shm-crash") == 0  # a live process's segment stays
    finally:
        seg.close()


def _host_id_in(*unshare_flags: str, setup: str = "") -> str:
    import subprocess
    import sys

    code = "from kvtransfer.shm import host_id; print(host_id())"
    script = f"{setup} exec {sys.executable} -c '{code}'"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(["unshare", *unshare_flags, "sh", "-c", script], capture_output=True,
                         text=True, timeout=60, cwd=root, env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a mount namespace)")
def test_host_id_names_the_shm_file_system_not_only_the_hostname() -> None:
    """Two processes under the same hostname but with different /dev/shm (containers of one
    machine, or namespaces) are different hosts for the shared-memory path; the same /dev/shm
    is the same host."""
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    here = shm.host_id()
    assert _host_id_in("--mount", "--propagation", "private") == here
    other = _host_id_in("--mount", "--propagation", "private",
                        setup="mount -t tmpfs -o size=1m tmpfs /dev/shm &&")
    assert other != here
    assert other.split("/")[:2] == here.split("/")[:2]  # same hostname, same boot
