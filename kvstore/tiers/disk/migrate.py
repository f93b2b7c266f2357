"""A version 1 store (one LMDB value per block at the top of ``disk_path``) becomes version 2.

Opening a directory that still holds the version 1 ``data.mdb`` copies its blocks into segment
files and the new index, then deletes the old file (the blocks live on in the new format):

- a block of this model (fingerprint and size) whose crc32 checks is migrated, with its LRU
  counter; any other value (another model, a bad checksum, an unknown header) is left behind
  and counted in the log line;
- blocks are migrated until the capacity is full (the least recently used are left behind);
- a ``data.mdb`` that is not a version 1 store (not LMDB, no ``blocks`` database) is renamed
  aside to ``data.mdb.bad-<time>``, never deleted, with a warning;
- a migration cut short (a crash) is completed by the next open: blocks already in the new
  index are skipped.

The cost is one read of the old file and one write of the new segments, once.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from pathlib import Path

import lmdb
import numpy as np

from kvstore.keys import BlockHash
from kvstore.layout import aligned_empty
from kvstore.tiers.disk.catalog import Catalog
from kvstore.tiers.disk.format import LEGACY_DATA, Entry
from kvstore.tiers.disk.index import DiskIndex
from kvstore.tiers.disk.segments import SegmentFiles

logger = logging.getLogger(__name__)

_V1_HEADER = struct.Struct("<4sHH16sQI4x")  # magic, version, reserved, fingerprint, length, crc
_V1_COUNTER = struct.Struct("<Q")
_BATCH_BYTES = 64 << 20


def legacy_store(
    path: Path,
    index: DiskIndex,
    segments: SegmentFiles,
    catalog: Catalog,
    fingerprint: bytes,
    block_nbytes: int,
) -> None:
    """Migrate ``path/data.mdb`` (version 1) into the version 2 store open at ``path``."""
    data = path / LEGACY_DATA
    t0 = time.perf_counter()
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=4, subdir=True)
    except lmdb.Error as e:
        _set_aside(path, f"not LMDB ({e})")
        return
    try:
        try:
            blocks, access = env.open_db(b"blocks"), env.open_db(b"access")
        except lmdb.Error as e:
            _set_aside(path, f"no version 1 block database ({e})")
            return
        with env.begin(buffers=True) as txn:
            order = sorted(
                ((_V1_COUNTER.unpack(v)[0], bytes(k)) for k, v in txn.cursor(db=access)
                 if len(v) == _V1_COUNTER.size),
                reverse=True,  # most recently used first: they are the ones that fit
            )
            counters = {k: c for c, k in order}
            keys = [k for _, k in order] + [
                bytes(k) for k in txn.cursor(db=blocks).iternext(values=False)
                if bytes(k) not in counters
            ]
        migrated, skipped = _copy(env, blocks, keys, counters, index, segments, catalog,
                                  fingerprint, block_nbytes)
    finally:
        env.close()
    for h in sorted(migrated, key=migrated.__getitem__):  # the LRU order they had
        index.entries.move_to_end(h)
    segments.sync()  # the new copies are durable before the old file goes
    catalog.env.sync(True)
    os.remove(data)
    (path / "lock.mdb").unlink(missing_ok=True)
    logger.warning(
        "disk store %s: migrated %d block(s) from format version 1 to 2 in %.1f s (%d other "
        "value(s) left behind: another model, a bad checksum or no room); removed %s",
        path, len(migrated), time.perf_counter() - t0, skipped, data,
    )


def _copy(
    env: lmdb.Environment,
    blocks: lmdb._Database,
    keys: list[bytes],
    counters: dict[bytes, int],
    index: DiskIndex,
    segments: SegmentFiles,
    catalog: Catalog,
    fingerprint: bytes,
    block_nbytes: int,
) -> tuple[dict[BlockHash, int], int]:
    """Copy the blocks (most recently used first); the ones migrated with their counter, and
    how many were left behind."""
    slot_nbytes = segments.slot_nbytes
    per_batch = max(1, _BATCH_BYTES // slot_nbytes)
    buf = aligned_empty(per_batch, slot_nbytes)
    buf.zero_()
    rows = buf.numpy()
    migrated: dict[BlockHash, int] = {}
    skipped = 0
    for b0 in range(0, len(keys), per_batch):
        todo: list[tuple[BlockHash, int, int]] = []  # hash, crc, access
        with env.begin(db=blocks, buffers=True) as txn:
            for k in keys[b0 : b0 + per_batch]:
                h = BlockHash(k)
                value = txn.get(k)
                if h in index.entries:
                    continue  # migrated by an earlier, interrupted open
                payload = _payload(value, fingerprint, block_nbytes)
                if payload is None:
                    skipped += 1
                    continue
                rows[len(todo), :block_nbytes] = np.frombuffer(payload, np.uint8)
                todo.append((h, zlib.crc32(payload), counters.get(k, 0)))
        slots = index.allocate(len(todo))
        skipped += len(todo) - len(slots)
        todo = todo[: len(slots)]
        for i, slot in enumerate(slots):
            segments.write(slot, [rows[i]])
        puts = [(h, Entry(fingerprint, slot_nbytes, block_nbytes, slot, crc, clock))
                for (h, crc, clock), slot in zip(todo, slots)]
        catalog.commit(puts)
        for h, entry in puts:
            index.add(h, entry.slot, entry.crc)
            index.clock = max(index.clock, entry.access)
            migrated[h] = entry.access
    return migrated, skipped


def _payload(
    value: memoryview | None, fingerprint: bytes, block_nbytes: int
) -> memoryview | None:
    if value is None or len(value) != _V1_HEADER.size + block_nbytes:
        return None
    magic, version, _, fp, length, crc = _V1_HEADER.unpack_from(value, 0)
    payload = value[_V1_HEADER.size :]
    if magic != b"STKV" or version != 1 or fp != fingerprint or length != block_nbytes:
        return None
    return payload if zlib.crc32(payload) == crc else None


def _set_aside(path: Path, reason: str) -> None:
    bad = path / f"{LEGACY_DATA}.bad-{int(time.time() * 1000)}"
    logger.warning(
        "disk store %s: %s is not a version 1 store (%s); moved it to %s", path, LEGACY_DATA,
        reason, bad,
    )
    os.replace(path / LEGACY_DATA, bad)
    (path / "lock.mdb").unlink(missing_ok=True)
