"""Writes of the disk tier: a bounded write-behind queue drained by one thread.

``WriteQueue`` holds copies of the blocks ``DiskTier.put`` accepted (aligned rows, one slot
each, so they go to disk with ``O_DIRECT`` as they are); a full queue refuses (counted, never
blocks). ``DiskWriter``'s thread takes up to ``max_batch`` of them at a time and, for each batch:

1. under the tier's lock: evicts LRU unpinned blocks until the batch fits the capacity, reserves
   slots (lowest free first: a batch lands in consecutive slots), takes the pending deletions
   and access counters (after the reservation, so the deletion of a slot's old entry commits no
   later than its new one);
2. with no lock: writes each run of consecutive slots with one ``pwritev`` and computes the
   crc32s, then commits the entries, deletions and access counters in one LMDB transaction;
3. under the lock: the blocks become readable (a block removed meanwhile is deleted again).

Blocks still queued or being written are served from the queue. A failed write or commit
refuses the batch with a logged error; the tier keeps serving what it has.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvstore.keys import BlockHash
from kvstore.tiers.disk.catalog import Catalog
from kvstore.tiers.disk.format import Entry, checksum
from kvstore.tiers.disk.index import DiskIndex
from kvstore.tiers.disk.segments import SegmentFiles, remove_class
from proto.vocab import EventKind

logger = logging.getLogger(__name__)

MAX_BATCH_BYTES = 64 << 20  # payload bytes per batch (one LMDB transaction)
_Batch = list[tuple[BlockHash, torch.Tensor]]  # (block, its queued row)


@dataclass(slots=True)
class DiskCounters:
    evictions: int = 0
    refused: int = 0  # writes refused: queue full, tier full of pinned blocks, write failed
    corrupt: int = 0  # blocks whose read failed its checksum (dropped)
    write_errors: int = 0  # batches that failed
    written: int = 0  # blocks committed


class WriteQueue:
    """Blocks accepted and not yet committed. Guarded by the tier's lock."""

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self.queued: OrderedDict[BlockHash, torch.Tensor] = OrderedDict()  # [slot_nbytes] rows
        self.inflight: dict[BlockHash, torch.Tensor] = {}  # taken by the writer
        self.cancelled: set[BlockHash] = set()  # removed while in flight

    def row(self, h: BlockHash) -> torch.Tensor | None:
        row = self.queued.get(h)
        if row is None and h not in self.cancelled:
            row = self.inflight.get(h)
        return row

    def holds(self, h: BlockHash) -> bool:
        return h in self.queued or (h in self.inflight and h not in self.cancelled)

    @property
    def full(self) -> bool:
        return len(self.queued) >= self.max_blocks

    def take(self, n: int) -> list[tuple[BlockHash, torch.Tensor]]:
        batch = [self.queued.popitem(last=False) for _ in range(min(n, len(self.queued)))]
        self.inflight.update(batch)
        return batch

    def __len__(self) -> int:
        return len(self.queued) + len(self.inflight)


class DiskWriter:
    def __init__(
        self,
        cond: threading.Condition,
        index: DiskIndex,
        queue: WriteQueue,
        segments: SegmentFiles,
        catalog: Catalog,
        fingerprint: bytes,
        block_nbytes: int,
        counters: DiskCounters,
        emit: Callable[[EventKind, list[BlockHash]], None],
    ) -> None:
        self._cond = cond
        self.index = index
        self.queue = queue
        self.segments = segments
        self.catalog = catalog
        self.fingerprint = fingerprint
        self.block_nbytes = block_nbytes
        self.counters = counters
        self._emit = emit
        self.max_batch = max(1, MAX_BATCH_BYTES // segments.slot_nbytes)
        self.busy = False  # a batch is being written (guarded by the lock)
        self.closing = False
        self._thread = threading.Thread(target=self._loop, name="strata-disk-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def idle(self) -> bool:
        """Nothing queued or being written, nothing to delete (lock held)."""
        return not (self.queue or self.index.deletes or self.busy) or not self.is_alive()

    def close(self) -> None:
        with self._cond:
            self.closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self.queue.queued or self.index.deletes or self.closing
                )
                stop = self.closing and not self.queue.queued and not self.index.deletes
                batch, slots, clocks, victims, emptied = self._take_locked()
                deletes = self.index.take_deletes()
                touched = self._touched_locked()
                self.busy = True
            try:
                self._emit(EventKind.REMOVED, victims)
                self._write(batch, slots, clocks, deletes, touched)
                for slot_nbytes in emptied:  # the deletions are committed: the files can go
                    remove_class(self.catalog.path, slot_nbytes)
            except Exception:
                logger.exception("disk store %s: write batch failed", self.catalog.path)
                with self._cond:
                    self.counters.write_errors += 1
                    self.counters.refused += len(batch)
                    self.index.unreserve(slots)
                    self.index.deletes |= deletes  # retried with the next batch
            finally:
                with self._cond:
                    for h, _ in batch:
                        self.queue.inflight.pop(h, None)
                        self.queue.cancelled.discard(h)
                    self.busy = False
                    self._cond.notify_all()
            if stop:
                return

    def _take_locked(self) -> tuple[_Batch, list[int], list[int], list[BlockHash], list[int]]:
        """The next batch, its slots and access counters, the blocks evicted for it, and the
        foreign slot sizes the evictions emptied."""
        batch = self.queue.take(self.max_batch)
        victims = self.index.victims(len(batch)) if batch else []
        emptied: list[int] = []
        for h in victims:
            emptied += self.index.drop(h)
        self.counters.evictions += len(victims)
        slots = self.index.allocate(len(batch))
        if len(slots) < len(batch):  # every other block is pinned or being read: refuse
            self.counters.refused += len(batch) - len(slots)
            for h, _ in batch[len(slots) :]:
                self.queue.inflight.pop(h, None)
            batch = batch[: len(slots)]
        clocks = [self.index.next_clock() for _ in batch]
        return batch, slots, clocks, victims, emptied

    def _touched_locked(self) -> list[tuple[BlockHash, Entry]]:
        """Entries whose access counter changed, to rewrite."""
        out = []
        for h, clock in self.index.take_dirty().items():
            e = self.index.entries.get(h)
            if e is not None and not e.foreign:
                out.append((h, Entry(self.fingerprint, e.slot_nbytes, self.block_nbytes, e.slot,
                                     e.crc, clock)))
        return out

    def _write(
        self,
        batch: list[tuple[BlockHash, torch.Tensor]],
        slots: list[int],
        clocks: list[int],
        deletes: set[BlockHash],
        touched: list[tuple[BlockHash, Entry]],
    ) -> None:
        nb = self.block_nbytes
        rows = [row.numpy() for _, row in batch]
        ok = [True] * len(batch)
        for first, end in _runs(slots, self.segments):
            try:
                self.segments.write(slots[first], rows[first:end])
            except OSError as e:
                logger.warning("disk store %s: writing %d block(s) failed: %s",
                               self.catalog.path, end - first, e)
                ok[first:end] = [False] * (end - first)
        puts = [
            (h, Entry(self.fingerprint, self.segments.slot_nbytes, nb, slot, checksum(r[:nb].data),
                      clock))
            for (h, _), slot, r, clock, good in zip(batch, slots, rows, clocks, ok) if good
        ]
        self.catalog.commit(puts + touched, deletes)
        written: list[BlockHash] = []
        with self._cond:
            self.index.unreserve([s for s, good in zip(slots, ok) if not good])
            self.counters.refused += ok.count(False)
            for h, entry in puts:
                if h in self.queue.cancelled:  # removed while being written: delete it again
                    self.index.unreserve([entry.slot])
                    self.index.deletes.add(h)
                    continue
                self.index.add(h, entry.slot, entry.crc)
                written.append(h)
            self.counters.written += len(written)
        self._emit(EventKind.STORED, written)


def _runs(slots: list[int], segments: SegmentFiles) -> list[tuple[int, int]]:
    """``[first, end)`` index ranges of consecutive slots in one segment file."""
    out: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(slots) + 1):
        if (
            i == len(slots)
            or slots[i] != slots[i - 1] + 1
            or segments.segment_of(slots[i]) != segments.segment_of(slots[start])
        ):
            out.append((start, i))
            start = i
    return out
