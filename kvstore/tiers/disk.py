"""Disk tier: one LMDB environment, one checksummed value per block, a write-behind thread.

- Index in memory (rebuilt on open by scanning the keys and value headers): block_hash -> entry,
  in an LRU order that survives restarts (access counters are persisted in the ``access`` db by
  the writer thread). Blocks written under another model fingerprint are indexed as foreign:
  never served, first to be evicted.
- Writes: ``put`` copies the rows into a bounded queue (``write_queue_blocks``) and returns; a
  full queue refuses (counted, never blocks). The writer drains the queue into one write
  transaction per batch, after evicting LRU unpinned blocks (in their own transaction, so their
  pages are free again) to stay under ``fill_ratio`` of ``map_size``; ``MapFullError`` -> evict
  more and retry once, else the batch is refused and a warning logged.
- Reads: one read transaction per batch, zero-copy buffers, header and crc32 verified, copied
  into the caller's tensor inside the transaction. A bad value is a miss: it is deleted and
  counted in ``corrupt_blocks``; reads never raise for bad data.
- Blocks still queued (or being written) are served from the queue.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import lmdb
import numpy as np
import torch

from kvstore.events import EventKind, PublishFn
from kvstore.keys import HASH_NBYTES, BlockHash
from kvstore.tiers.disk_format import (
    HEADER_NBYTES,
    checksum,
    decode_header,
    encode_value,
    open_env,
    value_footprint,
)

logger = logging.getLogger(__name__)

_COUNTER = struct.Struct("<Q")
_ENV_FINGERPRINT_KEY = b"fingerprint"
_MAX_BATCH_BYTES = 64 << 20  # bytes of payload per write transaction


@dataclass(slots=True)
class _DiskEntry:
    footprint: int  # estimated bytes of the map the value takes (only used for foreign blocks)
    foreign: bool  # written under another model fingerprint: never served, evicted first


class DiskTier:
    name = "disk"

    def __init__(
        self,
        path: str,
        capacity_bytes: int,
        block_nbytes: int,
        fingerprint: bytes,
        *,
        write_queue_blocks: int = 256,
        publish: PublishFn | None = None,
        fill_ratio: float = 0.85,
    ) -> None:
        if not 0.0 < fill_ratio <= 0.95:
            raise ValueError(f"fill_ratio must be in (0, 0.95], got {fill_ratio}")
        self.path = path
        self.block_nbytes = block_nbytes
        self.fingerprint = fingerprint
        self.map_size = capacity_bytes
        self._publish = publish
        self._max_queue = write_queue_blocks
        opened = open_env(path, capacity_bytes)
        self._env, self._lock_file = opened.env, opened.lock_file
        self._blocks_db = opened.dbs[b"blocks"]
        self._access_db = opened.dbs[b"access"]
        self._env_db = opened.dbs[b"env"]
        page_size = self._env.stat()["psize"]
        self._value_nbytes = HEADER_NBYTES + block_nbytes
        # LMDB needs slack: a write copies every page it touches, and the pages freed by the
        # last two or three transactions are not reusable yet. Bound the pages one write
        # transaction dirties (batch size) and keep that slack free, within fill_ratio.
        dirty_pages = -(-value_footprint(self._value_nbytes, page_size) // page_size) + 2
        self._max_batch = max(
            1,
            min(
                _MAX_BATCH_BYTES // self._value_nbytes,
                capacity_bytes // (32 * dirty_pages * page_size),
            ),
        )
        slack = (4 * self._max_batch * dirty_pages + 24) * page_size
        self._budget = max(0, min(int(capacity_bytes * fill_ratio), capacity_bytes - slack))
        # Bytes of the map one block takes, LMDB's page overhead included: a static estimate,
        # then calibrated from LMDB's page counts after every write (_resync_usage).
        self._min_footprint = value_footprint(self._value_nbytes, page_size)
        self._footprint = self._min_footprint
        self._page_size = page_size

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._index: OrderedDict[BlockHash, _DiskEntry] = OrderedDict()  # LRU first
        self._used = 0  # bytes of the map our databases hold (measured, adjusted in between)
        self._clock = 0  # last access counter handed out
        self._dirty: dict[BlockHash, int] = {}  # access counters not yet persisted
        self._ref_cnt: dict[BlockHash, int] = {}
        self._queue: OrderedDict[BlockHash, torch.Tensor] = OrderedDict()  # write-behind
        self._inflight: dict[BlockHash, torch.Tensor] = {}  # taken by the writer, not committed
        self._cancelled: set[BlockHash] = set()  # removed while in flight
        self._deletes: set[BlockHash] = set()  # to delete from LMDB
        self._busy = False
        self._closing = False
        self.num_evictions = 0
        self.num_refused = 0
        self.num_corrupt = 0
        self.num_write_errors = 0
        self.num_written = 0
        if self._budget < 4 * self._value_nbytes:
            logger.warning(
                "disk store %s: map_size %d leaves room for almost no %d-byte block (LMDB needs "
                "slack); raise disk_capacity_bytes",
                path,
                capacity_bytes,
                block_nbytes,
            )
        self._load_index()
        self._resync_usage()
        self._writer = threading.Thread(
            target=self._writer_loop, name="strata-disk-writer", daemon=True
        )
        self._writer.start()

    # ----------------------------------------------------------------- queries
    def contains(self, block_hash: BlockHash) -> bool:
        with self._lock:
            return self._servable_locked(block_hash)

    @property
    def num_blocks(self) -> int:
        with self._lock:
            return sum(1 for e in self._index.values() if not e.foreign)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    @property
    def capacity_bytes(self) -> int:
        """Usable bytes (``fill_ratio`` of ``map_size`` less slack); ``used_bytes`` stays below."""
        return self._budget

    def ref_cnt(self, block_hash: BlockHash) -> int:
        with self._lock:
            return self._ref_cnt.get(block_hash, 0)

    def num_pinned(self) -> int:
        with self._lock:
            return len(self._ref_cnt)

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {
                "blocks": sum(1 for e in self._index.values() if not e.foreign),
                "foreign_blocks": sum(1 for e in self._index.values() if e.foreign),
                "pinned_blocks": len(self._ref_cnt),
                "queued_blocks": len(self._queue) + len(self._inflight),
                "used_bytes": self._used,
                "capacity_bytes": self._budget,
                "map_size": self.map_size,
                "written_blocks": self.num_written,
                "written_bytes": self.num_written * self.block_nbytes,
                "evictions": self.num_evictions,
                "refused_writes": self.num_refused,
                "corrupt_blocks": self.num_corrupt,
                "write_errors": self.num_write_errors,
            }

    # ----------------------------------------------------------------- reads
    def get_into(
        self, hashes: Sequence[BlockHash], out: torch.Tensor, rows: Sequence[int] | None = None
    ) -> list[bool]:
        """Copy block ``i`` into ``out[rows[i]]`` (``out[i]`` without ``rows``); True = copied.

        ``out``: uint8 ``[N, block_nbytes]`` CPU, e.g. the host slab with reserved ``rows``.
        """
        dst = list(range(len(hashes))) if rows is None else list(rows)
        assert len(dst) == len(hashes), (len(dst), len(hashes))
        assert not dst or (max(dst) < out.shape[0] and out.shape[1] == self.block_nbytes), out.shape
        found = [False] * len(hashes)
        queued: list[tuple[int, torch.Tensor]] = []
        to_read: list[int] = []
        with self._lock:
            for i, h in enumerate(hashes):
                row = self._queue.get(h)
                if row is None:
                    row = self._inflight.get(h)
                if row is not None:
                    queued.append((i, row))
                elif h in self._index and not self._index[h].foreign:
                    to_read.append(i)
        for i, row in queued:  # queued rows are private clones: safe to copy without the lock
            out[dst[i]].copy_(row)
            found[i] = True
        bad: list[BlockHash] = []
        if to_read:
            out_np = out.numpy()
            with self._env.begin(db=self._blocks_db, buffers=True) as txn:
                for i in to_read:
                    value = txn.get(hashes[i])
                    if value is None:
                        continue  # evicted since we looked
                    if self._valid(value):
                        out_np[dst[i]] = np.frombuffer(
                            value, np.uint8, self.block_nbytes, HEADER_NBYTES
                        )
                        found[i] = True
                    else:
                        bad.append(hashes[i])
        with self._lock:
            for i in to_read:
                if found[i] and hashes[i] in self._index:
                    self._touch_locked(hashes[i])
            for h in bad:
                self.num_corrupt += 1
                self._drop_locked(h)
            if bad:
                self._cond.notify_all()
        if bad:
            logger.warning("disk store %s: %d corrupt block(s) dropped", self.path, len(bad))
            self._emit("removed", bad)
        return found

    def _valid(self, value: memoryview) -> bool:
        header = decode_header(value)
        return (
            header is not None
            and header.fingerprint == self.fingerprint
            and header.payload_nbytes == self.block_nbytes
            and len(value) == self._value_nbytes
            and checksum(value[HEADER_NBYTES:]) == header.crc
        )

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
        with self._lock:
            for i, h in enumerate(hashes):
                if self._servable_locked(h) and h not in self._cancelled:
                    accepted[i] = True
                elif len(self._queue) >= self._max_queue or self._closing:
                    self.num_refused += 1
                else:
                    self._cancelled.discard(h)
                    self._queue[h] = data[src[i]].clone()
                    accepted[i] = True
            self._cond.notify_all()
        return accepted

    def remove(self, block_hash: BlockHash) -> bool:
        with self._lock:
            if block_hash in self._ref_cnt:
                return False
            removed = self._queue.pop(block_hash, None) is not None
            if block_hash in self._inflight:
                self._cancelled.add(block_hash)
                removed = True
            if block_hash in self._index:
                self._drop_locked(block_hash)
                self._cond.notify_all()
                removed = True
        if removed:
            self._emit("removed", [block_hash])
        return removed

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued write and delete is committed; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: (
                    not (self._queue or self._inflight or self._deletes or self._busy)
                    or not self._writer.is_alive()
                ),
                timeout_s,
            )

    # ----------------------------------------------------------------- pins
    def pin(self, block_hash: BlockHash) -> bool:
        with self._lock:
            if not self._servable_locked(block_hash):
                return False
            self._ref_cnt[block_hash] = self._ref_cnt.get(block_hash, 0) + 1
            return True

    def unpin(self, block_hash: BlockHash) -> None:
        with self._lock:
            n = self._ref_cnt.get(block_hash, 0)
            assert n > 0, f"unpin of disk block {block_hash.hex()} whose ref_cnt is already 0"
            if n == 1:
                del self._ref_cnt[block_hash]
            else:
                self._ref_cnt[block_hash] = n - 1

    def block_hashes(self) -> list[BlockHash]:
        """Every block this tier holds now (a resync of the router's index)."""
        with self._lock:
            return list(self._index)

    def close(self) -> None:
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        self._writer.join()
        self._env.close()
        self._lock_file.close()  # releases the flock

    # ----------------------------------------------------------------- internals (lock held)
    def _servable_locked(self, h: BlockHash) -> bool:
        if h in self._queue or h in self._inflight:
            return True
        entry = self._index.get(h)
        return entry is not None and not entry.foreign

    def _touch_locked(self, h: BlockHash) -> None:
        self._index.move_to_end(h)
        self._clock += 1
        self._dirty[h] = self._clock

    def _drop_locked(self, h: BlockHash) -> None:
        entry = self._index.pop(h, None)
        if entry is not None:
            freed = entry.footprint if entry.foreign else self._footprint
            self._used = max(0, self._used - freed)
            self._deletes.add(h)
            self._dirty.pop(h, None)

    def _evict_locked(self, need: int, limit: int | None = None) -> list[BlockHash]:
        """Drop LRU unpinned blocks until ``need`` more bytes fit under ``limit`` (the budget)."""
        limit = self._budget if limit is None else limit
        victims: list[BlockHash] = []
        for h in list(self._index):
            if self._used + need <= limit:
                break
            if h in self._ref_cnt:
                continue
            self._drop_locked(h)
            victims.append(h)
        self.num_evictions += len(victims)
        return victims

    def _emit(self, kind: EventKind, hashes: list[BlockHash]) -> None:
        if self._publish is not None and hashes:
            self._publish(kind, self.name, hashes)

    # ----------------------------------------------------------------- open + writer
    def _load_index(self) -> None:
        entries: list[tuple[int, int, BlockHash, _DiskEntry]] = []
        bad: list[bytes] = []
        with self._env.begin(buffers=True) as txn:
            access = {bytes(k): _COUNTER.unpack(v)[0] for k, v in txn.cursor(db=self._access_db)}
            for k, v in txn.cursor(db=self._blocks_db):
                h = BlockHash(bytes(k))
                header = decode_header(v)
                foreign = header is not None and header.fingerprint != self.fingerprint
                if (
                    header is None
                    or len(h) != HASH_NBYTES
                    or (not foreign and len(v) != self._value_nbytes)
                ):
                    bad.append(h)
                    continue
                footprint = value_footprint(len(v), self._page_size)
                order = 0 if foreign else 1  # foreign blocks first in the LRU: evicted first
                entries.append((order, access.get(h, 0), h, _DiskEntry(footprint, foreign)))
            stored_fingerprint = txn.get(_ENV_FINGERPRINT_KEY, db=self._env_db)
            old_fingerprint = None if stored_fingerprint is None else bytes(stored_fingerprint)
        entries.sort(key=lambda e: (e[0], e[1]))
        for _, _, h, entry in entries:
            self._index[h] = entry
            self._used += entry.footprint
        self._clock = max(access.values(), default=0)
        orphans = [k for k in access if k not in self._index]
        with self._env.begin(write=True) as wtxn:
            for key in bad:
                wtxn.delete(key, db=self._blocks_db)
            for key in bad + orphans:
                wtxn.delete(key, db=self._access_db)
            wtxn.put(_ENV_FINGERPRINT_KEY, self.fingerprint, db=self._env_db)
        self.num_corrupt += len(bad)
        num_foreign = sum(1 for e in self._index.values() if e.foreign)
        if old_fingerprint not in (None, self.fingerprint) or num_foreign:
            logger.info(
                "disk store %s holds %d block(s) of another model fingerprint: never served, "
                "evicted first",
                self.path,
                num_foreign,
            )
        if bad:
            logger.warning(
                "disk store %s: %d unreadable value(s) deleted on open", self.path, len(bad)
            )
        logger.info(
            "disk store %s opened: %d block(s), %d of %d bytes used",
            self.path,
            len(self._index) - num_foreign,
            self._used,
            self._budget,
        )

    def _writer_loop(self) -> None:
        max_batch = self._max_batch
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._deletes or self._closing)
                batch: list[tuple[BlockHash, torch.Tensor]] = []
                while self._queue and len(batch) < max_batch:
                    batch.append(self._queue.popitem(last=False))
                self._inflight.update(batch)
                deletes, self._deletes = self._deletes, set()
                dirty, self._dirty = self._dirty, {}
                stop = self._closing and not batch and not deletes
                self._busy = True
            try:
                self._write_batch(batch, deletes, dirty)
                self._resync_usage()
            except Exception:
                logger.exception("disk store %s: write batch failed", self.path)
                with self._lock:
                    self.num_write_errors += 1
                    self.num_refused += len(batch)
            finally:
                with self._cond:
                    for h, _ in batch:
                        self._inflight.pop(h, None)
                    self._busy = False
                    self._cond.notify_all()
            if stop:
                return

    def _write_batch(
        self,
        batch: list[tuple[BlockHash, torch.Tensor]],
        deletes: set[BlockHash],
        dirty: dict[BlockHash, int],
    ) -> None:
        values = [(h, encode_value(self.fingerprint, _row_view(row))) for h, row in batch]
        with self._lock:
            victims = self._evict_locked(len(values) * self._footprint)
            fit = max(0, (self._budget - self._used) // self._footprint)
            if fit < len(values):  # every remaining block is pinned: refuse the rest
                self.num_refused += len(values) - fit
                values = values[:fit]
        self._delete(deletes | set(victims))
        self._emit("removed", victims)
        written: list[BlockHash] = []
        for attempt in range(2):
            try:
                written = self._commit(values, dirty)
                break
            except lmdb.MapFullError:
                if attempt == 1:
                    logger.warning(
                        "disk store %s is full (map_size %d): %d block(s) refused",
                        self.path,
                        self.map_size,
                        len(values),
                    )
                    with self._lock:
                        self.num_refused += len(values)
                    break
                with self._lock:  # free one more batch worth of bytes, then retry once
                    extra = self._evict_locked(len(values) * self._footprint, limit=self._used)
                self._delete(set(extra))
                self._emit("removed", extra)
        self._emit("stored", written)

    def _commit(
        self, values: list[tuple[BlockHash, bytearray]], dirty: dict[BlockHash, int]
    ) -> list[BlockHash]:
        if not values and not dirty:
            return []
        with self._lock:
            clocks = []
            for _ in values:
                self._clock += 1
                clocks.append(self._clock)
        with self._env.begin(write=True) as txn:
            for (h, value), clock in zip(values, clocks):
                txn.put(h, value, db=self._blocks_db)
                txn.put(h, _COUNTER.pack(clock), db=self._access_db)
            for h, clock in dirty.items():
                txn.put(h, _COUNTER.pack(clock), db=self._access_db)
        written: list[BlockHash] = []
        with self._lock:
            for h, _ in values:
                if h in self._cancelled:
                    self._cancelled.discard(h)
                    self._deletes.add(h)
                    continue
                if h not in self._index:
                    self._index[h] = _DiskEntry(self._footprint, foreign=False)
                    self._used += self._footprint
                    written.append(h)
            self.num_written += len(written)
        return written

    def _resync_usage(self) -> None:
        """Measure the pages our databases hold; recalibrate the per-block footprint."""
        with self._env.begin() as txn:
            pages = 0
            for db in (self._blocks_db, self._access_db):
                st = txn.stat(db)
                pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
            num_entries = txn.stat(self._blocks_db)["entries"]
        used = pages * self._page_size
        with self._lock:
            self._used = used
            if num_entries:
                self._footprint = max(self._min_footprint, -(-used // num_entries))

    def _delete(self, hashes: set[BlockHash]) -> None:
        if not hashes:
            return
        with self._env.begin(write=True) as txn:
            for h in hashes:
                txn.delete(h, db=self._blocks_db)
                txn.delete(h, db=self._access_db)


def _row_view(row: torch.Tensor) -> memoryview:
    # row: [block_nbytes] uint8, contiguous CPU
    return memoryview(row.numpy().data)
