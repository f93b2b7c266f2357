"""The catalog: the LMDB environment that is the disk tier's store of record (``index/``).

``Catalog.open(disk_path, map_size)`` takes the directory's exclusive lock and opens (or creates)
the index; ``entries()`` reads every entry (startup: a scan of small records, never of the
payloads); ``commit(puts, deletes)`` writes one batch in one write transaction.

What happens to a path that is not a usable store:
- a regular file at ``disk_path`` -> ``DiskFormatError`` (we never touch a file we did not
  create; point ``disk_path`` at a directory);
- a directory that cannot be created, written or locked -> ``DiskUnavailableError`` (the store
  logs a warning and runs without its disk tier);
- an index that is not LMDB, is shorter than its own meta page says (truncated: reading it would
  fault), or lacks our named databases -> it is renamed to ``data.mdb.bad-<time>`` (never
  deleted), a warning is logged, and a fresh index is opened (the segments it described are
  then unreachable and are removed);
- an index of another format version -> ``DiskFormatError`` saying so (nothing is changed).

LMDB runs with ``sync=False, metasync=False``: commits are cheap, a process crash loses nothing,
an OS crash may lose the last commits (their blocks are then simply gone; checksums catch a slot
whose payload and entry disagree).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import lmdb

from kvstore.errors import DiskFormatError, DiskUnavailableError
from kvstore.keys import BlockHash
from kvstore.tiers.disk.format import (
    DB_INDEX,
    DB_META,
    DB_NAMES,
    FORMAT_VERSION,
    INDEX_DIR,
    KEY_FINGERPRINT,
    KEY_VERSION,
    LOCK_NAME,
    Entry,
    decode_entry,
    decode_u32,
    encode_entry,
    encode_u32,
)

logger = logging.getLogger(__name__)


class Catalog:
    def __init__(self, env: lmdb.Environment, lock_file: IO[bytes], path: Path, fresh: bool):
        self.env = env
        self.path = path  # the store directory
        self.fresh = fresh  # the index was created (or replaced) by this open
        self._lock_file = lock_file
        self._index = env.open_db(DB_INDEX)
        self._meta = env.open_db(DB_META)

    @classmethod
    def open(cls, disk_path: str, map_size: int) -> Catalog:
        path = Path(disk_path)
        if path.exists() and not path.is_dir():
            raise DiskFormatError(
                f"disk_path {path} is a regular file, not a store directory; point disk_path at "
                "a directory (it is created when missing)"
            )
        try:
            path.mkdir(parents=True, exist_ok=True)
            lock_file = open(path / LOCK_NAME, "ab")  # held open for the catalog's life
        except OSError as e:
            raise DiskUnavailableError(f"cannot create the disk store at {path}: {e}") from e
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            lock_file.close()
            raise DiskUnavailableError(f"disk store {path} is in use by another store: {e}") from e
        try:
            env, fresh = _open_index(path / INDEX_DIR, map_size)
        except BaseException:
            lock_file.close()
            raise
        return cls(env, lock_file, path, fresh)

    # ---- reads -----------------------------------------------------------------------------
    def entries(self) -> tuple[list[tuple[BlockHash, Entry]], list[bytes]]:
        """Every entry, and the keys whose value is not an entry (to delete)."""
        good: list[tuple[BlockHash, Entry]] = []
        bad: list[bytes] = []
        with self.env.begin(db=self._index) as txn:
            for key, value in txn.cursor():
                entry = decode_entry(value)
                if entry is None or len(key) != 16:
                    bad.append(bytes(key))
                else:
                    good.append((BlockHash(bytes(key)), entry))
        return good, bad

    def last_fingerprint(self) -> bytes | None:
        with self.env.begin(db=self._meta) as txn:
            value = txn.get(KEY_FINGERPRINT)
        return None if value is None else bytes(value)

    # ---- writes ----------------------------------------------------------------------------
    def commit(
        self, puts: Iterable[tuple[BlockHash, Entry]], deletes: Iterable[bytes] = ()
    ) -> None:
        """One write transaction: the deletes first, then the puts (raises ``lmdb.Error``)."""
        with self.env.begin(write=True, db=self._index) as txn:
            for key in deletes:
                txn.delete(key)
            for h, entry in puts:
                txn.put(h, encode_entry(entry))

    def set_fingerprint(self, fingerprint: bytes) -> None:
        with self.env.begin(write=True, db=self._meta) as txn:
            txn.put(KEY_FINGERPRINT, fingerprint)

    def close(self) -> None:
        self.env.close()
        self._lock_file.close()  # releases the flock


# ---- opening -------------------------------------------------------------------------------
class _Truncated(Exception):
    pass


def _open_index(index_dir: Path, map_size: int) -> tuple[lmdb.Environment, bool]:
    try:
        index_dir.mkdir(exist_ok=True)
    except OSError as e:
        raise DiskUnavailableError(f"cannot create the disk index at {index_dir}: {e}") from e
    try:
        try:
            return _open_lmdb(index_dir, map_size)
        except (
            lmdb.InvalidError,
            lmdb.VersionMismatchError,
            lmdb.CorruptedError,
            lmdb.IncompatibleError,
            _Truncated,
        ) as e:
            _quarantine(index_dir, e)
            return _open_lmdb(index_dir, map_size)
    except lmdb.Error as e:
        raise DiskUnavailableError(f"cannot open the disk index at {index_dir}: {e}") from e


def _open_lmdb(path: Path, map_size: int) -> tuple[lmdb.Environment, bool]:
    data_file = path / "data.mdb"
    existed = data_file.exists() and data_file.stat().st_size > 0
    if existed:
        # Validate before mapping for reads: pages past the end of a truncated file fault (SIGBUS).
        with lmdb.open(str(path), map_size=map_size, readonly=True, lock=False, max_dbs=0) as probe:
            info, psize = probe.info(), probe.stat()["psize"]
        if data_file.stat().st_size < (info["last_pgno"] + 1) * psize:
            raise _Truncated(
                f"{data_file} holds {data_file.stat().st_size} bytes but its meta page "
                f"references page {info['last_pgno']} of {psize} bytes"
            )
    env = lmdb.open(
        str(path),
        map_size=map_size,
        subdir=True,
        max_dbs=len(DB_NAMES),
        sync=False,
        metasync=False,
        lock=True,
        meminit=False,
    )
    try:
        fresh = not existed
        with env.begin(write=True) as txn:
            if existed:
                names = {bytes(k) for k, _ in txn.cursor()}
                if not set(DB_NAMES) <= names:
                    raise lmdb.InvalidError(f"{data_file} lacks the databases {DB_NAMES}")
            meta = env.open_db(DB_META, txn=txn)
            env.open_db(DB_INDEX, txn=txn)
            version = decode_u32(txn.get(KEY_VERSION, db=meta))
            if version is None:
                txn.put(KEY_VERSION, encode_u32(FORMAT_VERSION), db=meta)
                fresh = True
            elif version != FORMAT_VERSION:
                raise DiskFormatError(
                    f"the disk store at {path.parent} has format version {version}; this Strata "
                    f"reads version {FORMAT_VERSION}: point disk_path at another directory, or "
                    "delete this one (it is a cache)"
                )
    except BaseException:
        env.close()
        raise
    return env, fresh


def _quarantine(path: Path, reason: BaseException) -> None:
    bad = path / f"data.mdb.bad-{int(time.time() * 1000)}"
    logger.warning(
        "disk index %s is not a valid index (%s); moved it to %s and starting a fresh one",
        path,
        reason,
        bad,
    )
    os.replace(path / "data.mdb", bad)
    if (path / "lock.mdb").exists():
        os.remove(path / "lock.mdb")
