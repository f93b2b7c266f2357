"""Prefetch: move disk-resident blocks into the host slab while a request waits in the queue.

``Prefetcher.prefetch(hashes)`` returns at once; background threads read the leading disk blocks
straight into host slots (``lending.disk_to_slab``) and keep them pinned there until a load takes
them (``release``) or ``pin_timeout_s`` passes. A block already in host is pinned the same way,
so the host LRU cannot push it out before the request runs. The blocks a prefetch read from disk
are remembered while pinned (``from_disk``): the request found them on disk, and says so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from kvstore.keys import BlockHash
from kvstore.lending import disk_to_slab
from kvstore.metrics import StoreMetrics
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.host import HostTier

logger = logging.getLogger(__name__)


class Prefetcher:
    def __init__(
        self,
        host: HostTier,
        disk: DiskTier,
        num_threads: int,
        pin_timeout_s: float,
        metrics: StoreMetrics,
    ) -> None:
        self.host = host
        self.disk = disk
        self.num_threads = num_threads
        self.pin_timeout_s = pin_timeout_s
        self.metrics = metrics
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(num_threads, "strata-prefetch")
        self._inflight: dict[BlockHash, Future[None]] = {}  # prefetches not finished
        self._pins: dict[BlockHash, float] = {}  # host pin held by prefetch -> deadline
        self._read: set[BlockHash] = set()  # pinned blocks this prefetcher read from disk
        self._closed = False

    def prefetch(self, hashes: Sequence[BlockHash]) -> None:
        """Start moving the leading disk-resident blocks into host; returns at once."""
        if self._closed:
            return
        self.expire()
        deadline = time.monotonic() + self.pin_timeout_s
        todo: list[BlockHash] = []
        with self._lock:
            for h in hashes:
                if h in self._inflight or h in todo:
                    continue
                if self.host.pin(h):
                    self._hold_locked(h, deadline)
                elif self.disk.contains(h):
                    todo.append(h)
                else:
                    break
            num_tasks = min(self.num_threads, len(todo))
            for t in range(num_tasks):
                chunk = todo[t::num_tasks]
                future = self._executor.submit(self._task, chunk)
                for h in chunk:
                    self._inflight[h] = future

    def _task(self, hashes: list[BlockHash]) -> None:
        try:
            slots, read = disk_to_slab(self.host, self.disk, hashes)
            deadline = time.monotonic() + self.pin_timeout_s
            with self._lock:
                for h, slot, was_read in zip(hashes, slots, read):
                    if slot is not None:
                        self._hold_locked(h, deadline)
                        if was_read:
                            self._read.add(h)
            self.metrics.add("prefetched", sum(1 for s in slots if s is not None))
        except Exception:
            logger.exception("prefetch of %d block(s) failed", len(hashes))
        finally:
            with self._lock:
                for h in hashes:
                    self._inflight.pop(h, None)

    def inflight(self, block_hash: BlockHash) -> Future[None] | None:
        """The prefetch reading this block, if one is under way."""
        with self._lock:
            return self._inflight.get(block_hash)

    def wait_all(self, timeout_s: float | None = None) -> bool:
        """Wait for every prefetch started so far; False on timeout."""
        with self._lock:
            futures = set(self._inflight.values())
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for future in futures:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                future.result(remaining)
            except TimeoutError:
                return False
        return True

    def from_disk(self, hashes: Sequence[BlockHash]) -> set[BlockHash]:
        """Those of ``hashes`` that a prefetch read from disk and still holds."""
        with self._lock:
            return {h for h in hashes if h in self._read}

    def release(self, hashes: Sequence[BlockHash]) -> None:
        """A load took these blocks: drop the prefetch pins on them."""
        with self._lock:
            for h in hashes:
                if self._pins.pop(h, None) is not None:
                    self._read.discard(h)
                    self.host.unpin(h)

    def expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [h for h, deadline in self._pins.items() if deadline < now]
            for h in expired:
                del self._pins[h]
                self._read.discard(h)
                self.host.unpin(h)
        if expired:
            self.metrics.add("prefetch_expired", len(expired))

    def num_pinned(self) -> int:
        with self._lock:
            return len(self._pins)

    def num_inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def close(self) -> None:
        """Finish the prefetches under way and drop every prefetch pin. Idempotent."""
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for h in self._pins:
                self.host.unpin(h)
            self._pins.clear()
            self._read.clear()

    def _hold_locked(self, h: BlockHash, deadline: float) -> None:
        if h in self._pins:
            self.host.unpin(h)  # one prefetch pin per block: refresh its deadline instead
        self._pins[h] = deadline
