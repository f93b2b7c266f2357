"""``PendingLease``: a lease whose blocks arrive over time, for a load that must not block.

``TieredStore.start_load`` returns one at once: the host hits are pinned and ready, the disk hits
are being read into reserved host slots (or a private buffer) by the disk tier's reader threads,
and blocks a prefetch is reading arrive when it completes. The consumer (the engine, between its
steps) asks how many *leading* blocks are ready (``num_ready``), ``take``s them as ordinary
``Lease``s in pieces (so disk -> host -> device runs as a pipeline of chunks), and ``close``s the
pending lease when it has what it will use: the blocks not taken are unpinned (those still
being read are unpinned when their read completes, and are then ordinary cached host blocks).

A block that fails (missing, corrupt, no host slot) ends what can be taken: the blocks after it
are never handed out, whatever their state. Every callback into the store runs with no lock of
this object held.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch

from kvstore.keys import BlockHash
from kvstore.lending import Lease
from kvstore.tiers.disk.reader import DiskRead
from kvstore.tiers.host import HostTier

logger = logging.getLogger(__name__)

_WAITING, _READY, _FAILED = 0, 1, 2


class PendingLease:
    def __init__(
        self,
        hashes: list[BlockHash],
        tiers: list[str],
        base: torch.Tensor,
        rows: list[int],
        in_host: bool,
        *,
        host: HostTier | None,
        requested: int,
        read_here: list[bool],
        on_taken: Callable[[Lease], None],
        on_closed: Callable[[PendingLease], None],
        on_progress: Callable[[], None] | None = None,
    ) -> None:
        self.hashes = hashes  # the leading blocks found when the load started
        self.tiers = tiers  # where each was: "host" | "disk" (a prefetch from disk counts as disk)
        self.base = base  # [R, block_nbytes] uint8: the host slab, or a private buffer
        self.rows = rows  # row of ``base`` for block i (a host hit's: known when it arrives)
        self.in_host = in_host  # rows are host slots pinned for us (else a private buffer)
        self.requested = requested  # blocks the caller asked for (the rest were misses)
        self.read_here = read_here  # block i is read from disk by this load (not a prefetch)
        self.started = time.perf_counter()
        self.settled_at: float | None = None  # when the last block arrived or failed
        self.disk_read: DiskRead | None = None  # the reads under way (cancelled on close)
        self._host = host
        self._on_taken = on_taken
        self._on_closed = on_closed
        self._on_progress = on_progress
        self._lock = threading.Lock()
        self._state = [_WAITING] * len(hashes)
        self._num_waiting = len(hashes)
        self._ready = 0  # leading blocks ready
        self._end = len(hashes)  # first failed block (nothing from here on is handed out)
        self._cursor = 0  # leading blocks taken
        self._closed = False
        self._notified_closed = False

    @property
    def num_blocks(self) -> int:
        return len(self.hashes)

    # ---- progress (any thread) -----------------------------------------------------------------
    def num_ready(self) -> int:
        """Leading blocks ready to take (taken ones included)."""
        with self._lock:
            return self._ready

    def num_taken(self) -> int:
        with self._lock:
            return self._cursor

    def settled(self) -> bool:
        """No block is still on its way (each arrived or failed)."""
        with self._lock:
            return self._num_waiting == 0

    def end(self) -> int:
        """How many leading blocks can still arrive (before the first failure)."""
        with self._lock:
            return self._end

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until settled (synchronous callers only); False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.settled():
            if self.disk_read is not None:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not self.disk_read.wait(left):
                    return False
            if not self.settled():  # prefetches under way
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                time.sleep(0.001)
        return True

    # ---- the consumer ------------------------------------------------------------------------
    def take(self, n: int) -> Lease:
        """The next ``n`` ready blocks as a lease (``TieredStore.release`` it after its copy)."""
        with self._lock:
            assert not self._closed, "take after close"
            first = self._cursor
            assert first + n <= self._ready, (first, n, self._ready)
            self._cursor += n
        lease = Lease(
            self.hashes[first : first + n],
            self.base,
            self.rows[first : first + n],
            self.tiers[first : first + n],
            self.in_host,
        )
        self._on_taken(lease)
        return lease

    def close(self) -> None:
        """Done taking: unpin the rest (now, or when each read completes). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            unpin = [
                self.hashes[i]
                for i in range(self._cursor, len(self.hashes))
                if self._state[i] == _READY
            ]
            settled = self._num_waiting == 0
        if self.disk_read is not None:
            self.disk_read.cancel()
        self._unpin(unpin)
        if settled:
            self._notify_closed()

    # ---- arrivals (reader threads, prefetch callbacks, or the starting thread) -----------------
    def arrived(
        self, positions: list[int], oks: list[bool], slots: list[int] | None = None
    ) -> None:
        """Blocks ``positions`` arrived (``oks``) -- in their rows, or for a prefetch in host
        ``slots`` now pinned for us. Slab rows read from disk are committed to the host tier
        (readable, pinned for us) or given back."""
        if self.in_host and self._host is not None and slots is None:
            good = [self.hashes[p] for p, ok in zip(positions, oks) if ok]
            bad = [self.hashes[p] for p, ok in zip(positions, oks) if not ok]
            if bad:
                self._host.cancel(bad)
            if good:
                self._host.commit(good, pin=True)
        with self._lock:
            for j, (p, ok) in enumerate(zip(positions, oks)):
                assert self._state[p] == _WAITING, f"block {p} arrived twice"
                self._state[p] = _READY if ok else _FAILED
                if slots is not None and ok:
                    self.rows[p] = slots[j]
                if not ok:
                    self._end = min(self._end, p)
            self._num_waiting -= len(positions)
            while self._ready < self._end and self._state[self._ready] == _READY:
                self._ready += 1
            if self._num_waiting == 0:
                self.settled_at = time.perf_counter()
            closed, settled = self._closed, self._num_waiting == 0
            unpin = [self.hashes[p] for p, ok in zip(positions, oks) if ok] if closed else []
        self._unpin(unpin)
        if closed and settled:
            self._notify_closed()
        if self._on_progress is not None:
            self._on_progress()

    def await_prefetch(self, pos: int, future: Future[None], pin: Callable[[], int | None]) -> None:
        """Block ``pos`` is being read by a prefetch: it arrives when that completes (``pin``
        then pins it in host and gives its slot, or None)."""

        def done(_: Future[None]) -> None:
            try:
                slot = pin()
            except Exception:  # a failed pin is a miss
                logger.exception("pinning a prefetched block failed")
                slot = None
            self.arrived([pos], [slot is not None], [slot if slot is not None else -1])

        future.add_done_callback(done)

    # ---- internals ---------------------------------------------------------------------------
    def _unpin(self, hashes: list[BlockHash]) -> None:
        if self.in_host and self._host is not None:
            for h in hashes:
                self._host.unpin(h)

    def _notify_closed(self) -> None:
        with self._lock:
            if self._notified_closed:
                return
            self._notified_closed = True
        self._on_closed(self)
