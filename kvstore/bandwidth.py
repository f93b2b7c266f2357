"""Measured (never hard-coded) read bandwidth of each tier, on the medium it names.

``measure_bandwidth(block_nbytes, host_enabled, disk, write_step)`` gives GB/s per enabled tier
(``TieredStore.measure_bandwidth`` passes its own tiers):
- host: a batched copy of ``num_blocks`` rows of the block size, best of ``repeats`` (the host
  tier's read path is one ``index_select`` out of the slab, so this is its speed);
- disk: scratch blocks written through the tier, then read back through the tier's own read
  path (parallel ``O_DIRECT`` reads, checksums, the copy into the caller's rows), median of
  ``repeats``; the scratch blocks are removed. ``O_DIRECT`` never touches the page cache, so
  this is the device; where the filesystem refuses ``O_DIRECT`` the tier drops the pages it
  wrote and read, and ``disk_read_method`` says so.

``DiskTier.direct_read_floor_s(hashes)`` is the floor of the very bytes a load read, at the
moment it read them: those blocks' slots read raw the same way (both ``segments.direct_read_s``).

``device_read_ceiling(directory)`` is the device's own sequential read speed: a scratch file read
with ``O_DIRECT`` in 4 MiB requests at several queue depths (the best one), no checksum, no copy
-- what ``dd iflag=direct`` reports with more requests in flight. It is the floor benchmarks put
beside a load from disk. ``drop_os_caches`` empties the whole page cache (root only).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from kvstore.errors import StoreError
from kvstore.keys import BlockHash
from kvstore.layout import aligned_empty
from kvstore.tiers.disk.segments import direct_read_s
from proto.vocab import Tier

if TYPE_CHECKING:
    from kvstore.tiers.disk import DiskTier

PROBE_BYTES = 16 << 20  # at least this much is read to time the disk (past latency, caches)


def measure_bandwidth(
    block_nbytes: int, host_enabled: bool, disk: DiskTier | None, write_step: int,
    num_blocks: int | None = None, repeats: int = 3,
) -> dict[Tier, float]:
    """GB/s per enabled tier (``{"host": ..., "disk": ...}``); ``write_step``: blocks per put
    (the disk writer's queue depth)."""
    nb = block_nbytes
    if num_blocks is None:
        num_blocks = max(16, PROBE_BYTES // nb)
    if num_blocks <= 0 or repeats <= 0:
        raise ValueError("num_blocks and repeats must be positive")
    nbytes = num_blocks * nb
    src = torch.randint(0, 256, (num_blocks, nb), dtype=torch.uint8)
    dst = aligned_empty(num_blocks, nb)
    result: dict[Tier, float] = {}
    if host_enabled:
        idx = torch.randperm(num_blocks)
        best = min(_timed(lambda: torch.index_select(src, 0, idx, out=dst)) for _ in range(repeats))
        result[Tier.HOST] = nbytes / best / 1e9
    if disk is not None:
        num_blocks = min(num_blocks, max(1, disk.capacity_bytes // disk.slot_nbytes // 2))
        hashes = [BlockHash(os.urandom(16)) for _ in range(num_blocks)]
        for i in range(0, num_blocks, write_step):
            end = i + write_step
            if not all(disk.put(hashes[i:end], src[i:end])) or not disk.flush(60.0):
                raise StoreError("disk bandwidth probe: the write-behind queue refused the blocks")
        try:
            times = []
            for _ in range(repeats):
                times.append(_timed(lambda: disk.get_into(hashes, dst[:num_blocks])))
            if not torch.equal(dst[:num_blocks], src[:num_blocks]):
                raise StoreError("disk bandwidth probe read back different bytes")
        finally:
            for h in hashes:
                disk.remove(h)
            disk.flush(timeout_s=60.0)
        result[Tier.DISK] = num_blocks * nb / statistics.median(times) / 1e9
    return result


def disk_read_method(disk: DiskTier | None) -> str:
    """How the disk tier's reads reach the device (for benchmark reports)."""
    if disk is None:
        return "no disk tier"
    if disk.direct_io:
        return "O_DIRECT (the page cache is bypassed)"
    return "buffered (no O_DIRECT here): pages dropped after each read and write"


def device_read_ceiling(
    directory: str,
    nbytes: int = 256 << 20,
    request_nbytes: int = 4 << 20,
    depths: tuple[int, ...] = (1, 4, 8),
) -> float:
    """Sequential ``O_DIRECT`` read GB/s of the device holding ``directory``: the best of the
    queue depths (a scratch file of ``nbytes``, written and removed here). Raises ``OSError``
    where ``O_DIRECT`` is refused."""
    path = os.path.join(directory, f".strata-ceiling-{os.getpid()}")
    buf = aligned_empty(1, request_nbytes).numpy().reshape(-1)
    buf[:] = torch.randint(0, 256, (request_nbytes,), dtype=torch.uint8).numpy()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    try:
        for off in range(0, nbytes, request_nbytes):
            os.pwrite(fd, buf.data, off)
        os.fsync(fd)
        return nbytes / direct_read_s([(fd, 0, nbytes)], request_nbytes, depths) / 1e9
    finally:
        os.close(fd)
        os.unlink(path)


def drop_os_caches() -> bool:
    """``sync`` then ``echo 3 > /proc/sys/vm/drop_caches``: every clean page leaves the page
    cache (root only; False where it could not be done)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def drop_page_cache(disk_path: str) -> bool:
    """``POSIX_FADV_DONTNEED`` on every file of the store (its index; segment files are read
    with ``O_DIRECT`` and never cached). Best effort: False where it could not be done."""
    ok = True
    for root, _, files in os.walk(disk_path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                ok = False
                continue
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                ok = False
            finally:
                os.close(fd)
    return ok


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return max(time.perf_counter() - start, 1e-9)

