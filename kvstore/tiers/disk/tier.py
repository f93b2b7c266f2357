"""``DiskTier``: blocks in segment files, indexed by LMDB, read with ``O_DIRECT`` in parallel.

The parts, one module each: ``format`` (the on-disk format), ``catalog`` (the LMDB index, the
store of record), ``index`` (the index in memory: LRU, pins, free slots), ``segments`` (the
payload files), ``reader`` (parallel verified reads), ``writer`` (the write-behind thread) and
``migrate`` (a version 1 store becomes a version 2 one on open).

- Open: the catalog's entries (40 bytes each) are read into the index; no payload is read, so
  opening costs a scan of small records, however large the tier. Blocks of another model
  fingerprint are foreign: never served, first to be evicted.
- Writes: ``put`` copies the rows into the bounded write-behind queue and returns; the writer
  thread evicts, writes and commits in batches (``writer``).
- Reads: ``read_async`` starts the reads and returns; each block is reported once, from a
  reader thread (queued blocks and misses at once, from the caller's): found and verified, or
  not. ``get_into`` is the same, waited for. A block that fails its checksum (or a short read)
  is a miss: dropped and counted in ``corrupt_blocks``; reads never raise for bad data.
- Locks: one lock (``_cond``) guards the index and the queue; I/O, checksums and callbacks run
  with no lock held. Events are published with no lock held.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from kvstore.events import PublishFn
from kvstore.keys import BlockHash
from kvstore.layout import aligned_empty
from kvstore.tiers.disk import migrate
from kvstore.tiers.disk.catalog import Catalog
from kvstore.tiers.disk.format import (
    LEGACY_DATA,
    index_map_size,
    slot_nbytes_for,
    slots_per_segment,
)
from kvstore.tiers.disk.index import DiskIndex
from kvstore.tiers.disk.reader import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_READ_THREADS,
    DiskRead,
    DiskReader,
    ReadItem,
)
from kvstore.tiers.disk.segments import (
    SegmentFiles,
    classes_on_disk,
    direct_read_s,
    remove_all,
    remove_class,
)
from kvstore.tiers.disk.writer import DiskCounters, DiskWriter, WriteQueue
from proto.vocab import EventKind, Tier

logger = logging.getLogger(__name__)

# positions (in the caller's list) and whether each was read; called once per position
BlocksDone = Callable[[list[int], list[bool]], None]


class DiskTier:
    name = Tier.DISK

    def __init__(
        self,
        path: str,
        capacity_bytes: int,
        block_nbytes: int,
        fingerprint: bytes,
        *,
        write_queue_blocks: int = 256,
        publish: PublishFn | None = None,
        read_threads: int = DEFAULT_READ_THREADS,
        read_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        read_limit_bytes_per_s: float = 0.0,
        direct_io: bool = True,
    ) -> None:
        self.path = path
        self.block_nbytes = block_nbytes
        self.fingerprint = fingerprint
        self.slot_nbytes = slot_nbytes_for(block_nbytes)
        self._publish = publish
        self._cond = threading.Condition()
        self.counters_ = DiskCounters()
        self.catalog = Catalog.open(path, index_map_size(capacity_bytes))
        try:
            self.index = DiskIndex(self.slot_nbytes, capacity_bytes)
            self._load()
            self.segments = SegmentFiles(
                path,
                self.slot_nbytes,
                slots_per_segment(self.slot_nbytes, capacity_bytes),
                direct=direct_io,
            )
            if (Path(path) / LEGACY_DATA).exists():
                migrate.legacy_store(Path(path), self.index, self.segments, self.catalog,
                                     fingerprint, block_nbytes)
            self.catalog.set_fingerprint(fingerprint)
        except BaseException:
            self.catalog.close()
            raise
        self.queue = WriteQueue(write_queue_blocks)
        self.reader = DiskReader(
            self.segments,
            block_nbytes,
            num_threads=read_threads,
            chunk_bytes=read_chunk_bytes,
            limit_bytes_per_s=read_limit_bytes_per_s,
        )
        self.writer = DiskWriter(
            self._cond, self.index, self.queue, self.segments, self.catalog, fingerprint,
            block_nbytes, self.counters_, self._emit,
        )
        self.writer.start()
        if self.index.max_slots < 4:
            logger.warning(
                "disk store %s: capacity %d holds %d block(s) of %d bytes; raise "
                "disk_capacity_bytes",
                path, capacity_bytes, self.index.max_slots, block_nbytes,
            )

    def _load(self) -> None:
        if self.catalog.fresh:
            remove_all(self.path)  # segments no index describes: unreachable
        # Hundreds of thousands of small objects: the cyclic GC would scan the whole heap (a
        # process with torch loaded) again and again meanwhile; they hold no cycles.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            entries, bad = self.catalog.entries()
            shared = self.index.load(entries, self.fingerprint, self.block_nbytes)
        finally:
            if gc_was_enabled:
                gc.enable()
        if bad or shared:
            self.catalog.commit([], bad + list(shared))
            logger.warning("disk store %s: %d unreadable entries deleted on open", self.path,
                           len(bad) + len(shared))
        for slot_nbytes in classes_on_disk(self.path):
            if slot_nbytes != self.slot_nbytes and slot_nbytes not in self.index.foreign_classes:
                remove_class(self.path, slot_nbytes)
        old = self.catalog.last_fingerprint()
        if self.index.num_foreign or old not in (None, self.fingerprint):
            logger.info(
                "disk store %s holds %d block(s) of another model fingerprint or block size: "
                "never served, evicted first",
                self.path, self.index.num_foreign,
            )
        logger.info(
            "disk store %s opened: %d block(s), %d of %d bytes used",
            self.path, self.index.num_blocks, self.index.used_bytes, self.index.capacity_bytes,
        )

    # ----------------------------------------------------------------- queries
    def contains(self, block_hash: BlockHash) -> bool:
        with self._cond:
            return self._servable_locked(block_hash)

    @property
    def num_blocks(self) -> int:
        with self._cond:
            return self.index.num_blocks

    @property
    def used_bytes(self) -> int:
        with self._cond:
            return self.index.used_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.index.capacity_bytes

    @property
    def direct_io(self) -> bool:
        """Reads and writes bypass the page cache (``O_DIRECT``)."""
        return self.segments.direct

    @property
    def read_bytes_per_s(self) -> float | None:
        """Moving average of the speed of recent reads of 1 MiB or more (None before any)."""
        return self.reader.read_bytes_per_s

    def ref_cnt(self, block_hash: BlockHash) -> int:
        with self._cond:
            return self.index.ref_cnt.get(block_hash, 0)

    def num_pinned(self) -> int:
        with self._cond:
            return len(self.index.ref_cnt)

    def counters(self) -> dict[str, int]:
        with self._cond:
            c = self.counters_
            return {
                "blocks": self.index.num_blocks,
                "foreign_blocks": self.index.num_foreign,
                "pinned_blocks": len(self.index.ref_cnt),
                "queued_blocks": len(self.queue),
                "used_bytes": self.index.used_bytes,
                "capacity_bytes": self.index.capacity_bytes,
                "written_blocks": c.written,
                "written_bytes": c.written * self.block_nbytes,
                "read_bytes": self.reader.bytes_read,
                "evictions": c.evictions,
                "refused_writes": c.refused,
                "corrupt_blocks": c.corrupt,
                "write_errors": c.write_errors,
                "direct_io": int(self.segments.direct),
            }

    # ----------------------------------------------------------------- reads
    def read_async(
        self,
        hashes: Sequence[BlockHash],
        out: torch.Tensor,
        rows: Sequence[int] | None,
        on_blocks: BlocksDone,
    ) -> DiskRead:
        """Start reading block ``i`` into ``out[rows[i]]`` (``out[i]`` without ``rows``).

        ``out``: uint8 ``[N, block_nbytes]`` CPU (e.g. the host slab with reserved rows; rows
        aligned to 4 KiB are read into directly). ``on_blocks(positions, found)`` reports every
        position once: queued blocks and blocks the tier lacks before this returns, the rest
        from reader threads as their chunk completes (no lock held)."""
        dst = list(range(len(hashes))) if rows is None else list(rows)
        assert len(dst) == len(hashes), (len(dst), len(hashes))
        assert not dst or (max(dst) < out.shape[0] and out.shape[1] == self.block_nbytes), out.shape
        out_np = out.numpy()
        queued: list[tuple[int, torch.Tensor]] = []
        missing: list[int] = []
        items: list[ReadItem] = []
        with self._cond:
            for i, h in enumerate(hashes):
                row = self.queue.row(h)
                entry = self.index.servable(h) if row is None else None
                if row is not None:
                    queued.append((i, row))
                elif entry is not None:
                    self.index.begin_read(entry.slot)
                    items.append(ReadItem(i, entry.slot, entry.crc, out_np[dst[i]]))
                else:
                    missing.append(i)
        for i, row in queued:  # private copies: safe without the lock
            out[dst[i]].copy_(row[: self.block_nbytes])
        if queued:
            on_blocks([i for i, _ in queued], [True] * len(queued))
        if missing:
            on_blocks(missing, [False] * len(missing))
        return self.reader.submit(items, self._chunk_done(hashes, on_blocks))

    def get_into(
        self, hashes: Sequence[BlockHash], out: torch.Tensor, rows: Sequence[int] | None = None
    ) -> list[bool]:
        """``read_async`` waited for: True where block ``i`` was copied into its row."""
        found = [False] * len(hashes)

        def done(positions: list[int], oks: list[bool]) -> None:
            for i, ok in zip(positions, oks):
                found[i] = ok

        self.read_async(hashes, out, rows, done).wait()
        return found

    def _chunk_done(
        self, hashes: Sequence[BlockHash], on_blocks: BlocksDone
    ) -> Callable[[list[ReadItem], list[bool], bool], None]:
        def done(items: list[ReadItem], oks: list[bool], cancelled: bool) -> None:
            bad: list[BlockHash] = []
            with self._cond:
                for item, ok in zip(items, oks):
                    h = hashes[item.pos]
                    self.index.end_read(item.slot)
                    entry = self.index.entries.get(h)
                    if entry is None or entry.slot != item.slot:
                        continue  # removed (or rewritten) while being read
                    if ok:
                        self.index.touch(h)
                    elif not cancelled:
                        bad.append(h)
                        self.counters_.corrupt += 1
                        self.index.drop(h)
                if bad:
                    self._cond.notify_all()
            if bad:
                logger.warning("disk store %s: %d corrupt block(s) dropped", self.path, len(bad))
                self._emit(EventKind.REMOVED, bad)
            on_blocks([item.pos for item in items], oks)

        return done

    # ----------------------------------------------------------------- writes
    def put(
        self, hashes: Sequence[BlockHash], data: torch.Tensor, rows: Sequence[int] | None = None
    ) -> list[bool]:
        """Queue ``data[rows[i]]`` (``data[i]`` without ``rows``) for the writer, copied now;
        refused when the queue is full."""
        # data: [N, block_nbytes] uint8, CPU
        src = list(range(len(hashes))) if rows is None else list(rows)
        assert not src or (max(src) < data.shape[0] and data.shape[1] == self.block_nbytes)
        accepted = [False] * len(hashes)
        with self._cond:
            take: list[int] = []
            taken: set[BlockHash] = set()
            for i, h in enumerate(hashes):
                if self._servable_locked(h) or h in taken:
                    accepted[i] = True
                elif len(self.queue.queued) + len(take) >= self.queue.max_blocks or (
                    self.writer.closing
                ):
                    self.counters_.refused += 1
                else:
                    take.append(i)
                    taken.add(h)
                    accepted[i] = True
            if take:
                buf = aligned_empty(len(take), self.slot_nbytes)
                if self.slot_nbytes > self.block_nbytes:
                    buf[:, self.block_nbytes :] = 0
                idx = torch.tensor([src[i] for i in take], dtype=torch.int64)
                torch.index_select(data, 0, idx, out=buf[:, : self.block_nbytes])
                for j, i in enumerate(take):
                    self.queue.cancelled.discard(hashes[i])
                    self.queue.queued[hashes[i]] = buf[j]
                self._cond.notify_all()
        return accepted

    def remove(self, block_hash: BlockHash) -> bool:
        emptied: list[int] = []
        with self._cond:
            if block_hash in self.index.ref_cnt:
                return False
            removed = self.queue.queued.pop(block_hash, None) is not None
            if block_hash in self.queue.inflight:
                self.queue.cancelled.add(block_hash)
                removed = True
            if block_hash in self.index.entries:
                emptied = self.index.drop(block_hash)
                self._cond.notify_all()
                removed = True
        for slot_nbytes in emptied:
            remove_class(self.path, slot_nbytes)
        if removed:
            self._emit(EventKind.REMOVED, [block_hash])
        return removed

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued write and delete is committed; False on timeout."""
        with self._cond:
            return self._cond.wait_for(self.writer.idle, timeout_s)

    # ----------------------------------------------------------------- pins
    def pin(self, block_hash: BlockHash) -> bool:
        with self._cond:
            if not self._servable_locked(block_hash):
                return False
            self.index.pin(block_hash)
            return True

    def unpin(self, block_hash: BlockHash) -> None:
        with self._cond:
            self.index.unpin(block_hash)

    def direct_read_floor_s(self, hashes: Sequence[BlockHash]) -> float | None:
        """Seconds the device takes to read these blocks' slots now, raw (``O_DIRECT``, best
        queue depth, no checksum, no copy: ``segments.direct_read_s``): the floor of a
        load of exactly these bytes. None without ``O_DIRECT`` or when a block is not on disk."""
        if not self.segments.direct:
            return None
        with self._cond:
            entries = [self.index.servable(h) for h in hashes]
        if any(e is None for e in entries):
            return None
        return direct_read_s(self.segments.runs([e.slot for e in entries if e is not None]))

    def block_hashes(self) -> list[BlockHash]:
        """Every block this tier serves now (a resync of the router's index)."""
        with self._cond:
            return [h for h, e in self.index.entries.items() if not e.foreign]

    def close(self) -> None:
        if self.writer.closing:
            return
        self.writer.close()
        self.reader.close()
        self.segments.close()
        self.catalog.close()

    # ----------------------------------------------------------------- internals
    def _servable_locked(self, h: BlockHash) -> bool:
        return self.queue.holds(h) or self.index.servable(h) is not None

    def _emit(self, kind: EventKind, hashes: list[BlockHash]) -> None:
        if self._publish is not None and hashes:
            self._publish(kind, self.name, hashes)

