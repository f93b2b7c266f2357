"""Measured (never hard-coded) read bandwidth of each tier, for benchmarks and the cost model.

``measure_bandwidth(store)`` times, best of ``repeats``:
- host: a batched copy of ``num_blocks`` rows of the block size (the host tier's read path is
  one ``index_select`` out of the slab, so this is its speed);
- disk: writing ``num_blocks`` scratch blocks through the write-behind queue, dropping them from
  the OS page cache where the OS allows (fsync + POSIX_FADV_DONTNEED), then one batched
  ``get_into`` (LMDB read + header and crc32 check + copy). The scratch blocks are removed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from kvstore.errors import StoreError
from kvstore.keys import BlockHash

if TYPE_CHECKING:
    from kvstore.store import TieredStore


def measure_bandwidth(
    store: TieredStore, num_blocks: int = 16, repeats: int = 3
) -> dict[str, float]:
    """GB/s per enabled tier (``{"host": ..., "disk": ...}``)."""
    if num_blocks <= 0 or repeats <= 0:
        raise ValueError("num_blocks and repeats must be positive")
    nbytes = num_blocks * store.block_nbytes
    src = torch.randint(0, 256, (num_blocks, store.block_nbytes), dtype=torch.uint8)
    dst = torch.empty_like(src)
    result: dict[str, float] = {}
    if store.host is not None:
        idx = torch.randperm(num_blocks)
        best = min(_timed(lambda: torch.index_select(src, 0, idx, out=dst)) for _ in range(repeats))
        result["host"] = nbytes / best / 1e9
    disk = store.disk
    if disk is not None:
        hashes = [BlockHash(os.urandom(16)) for _ in range(num_blocks)]
        if not all(disk.put(hashes, src)) or not disk.flush(timeout_s=60.0):
            raise StoreError("disk bandwidth probe: the write-behind queue refused the blocks")
        times = []
        for _ in range(repeats):
            drop_page_cache(disk.path)
            times.append(_timed(lambda: disk.get_into(hashes, dst)))
        assert torch.equal(dst, src), "disk bandwidth probe read back different bytes"
        for h in hashes:
            disk.remove(h)
        disk.flush(timeout_s=60.0)
        result["disk"] = nbytes / min(times) / 1e9
    return result


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return max(time.perf_counter() - start, 1e-9)


def drop_page_cache(disk_path: str) -> bool:
    """fsync + POSIX_FADV_DONTNEED on the LMDB data file, so later reads come from the disk.

    Best effort: False where it could not be done (then reads may hit the page cache)."""
    data_file = os.path.join(disk_path, "data.mdb")
    try:
        fd = os.open(data_file, os.O_RDONLY)
    except OSError:
        return False
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False  # then a read figure is the page-cache read speed
    finally:
        os.close(fd)
