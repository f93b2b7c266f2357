"""Interned block ids: a 16-byte block hash -> a small integer, kept in numpy arrays.

An open-addressing table with linear probing. A block's id is its slot; a slot is one 16-byte
record: 96 bits of the hash (its first 8 bytes, and 4 more: a collision between two live blocks
of a cluster has odds of ~n^2 / 2^97, and would cost a misplaced request, never a wrong answer:
workers look blocks up by their full hash) and the id of the block's row (``row_of``,
``router.block_rows``: who holds it, in which tiers): ``FREE`` (0) for a slot never used (a
fresh table is all zeros), ``EMPTY_ROW`` (1) for a known hash nobody holds any more (a
tombstone: a block stored again takes its old slot back), a larger row id for a held block.

A batch of hashes is resolved by a few vectorized probe rounds: each round is one gather of
records (one cache line a hash) over the hashes still unresolved, and at the load factors kept
here most of them resolve in the first. That is what keeps the index in cache-friendly arrays
instead of a dict of Python objects per block (a block costs 16 bytes a slot here, ~30-55
bytes a block, and no pointer chase).

The table grows, and drops its tombstones, by rebuilding itself: every id changes then.
``find(..., insert=True)`` is the only call that can rebuild, and it returns ids valid after
it; callers keep no ids across a call that may insert.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvstore.keys import HASH_NBYTES

FREE = 0  # row_of of a slot never used (the row table's row 0 holds nothing either)
EMPTY_ROW = 1  # row_of of a known hash nobody holds (and the id of the empty row)

_MIN_CAPACITY = 1 << 12
_MAX_LOAD = 0.6  # used slots (held + tombstones) over capacity that triggers a rebuild
_TARGET_LOAD = 0.3  # held blocks over capacity right after a rebuild


_RECORD = np.dtype([("k0", "<u8"), ("k1", "<u4"), ("row", "<i4")])
_KEY = np.dtype([("k0", "<u8"), ("k1", "<u4"), ("rest", "<u4")])  # a 16-byte hash
_WINDOW = 8  # slots a probe round after the first looks at per key (128 bytes)
_STEPS = np.arange(_WINDOW)
_FEW_KEYS = 32  # up to this many keys (a walk's first chunk), the first round looks at 4 slots


def split_hashes(hashes: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The table's key of each hash: its first 8 bytes (uint64) and the next 4 (uint32);
    ValueError unless all are 16 bytes."""
    raw = b"".join(hashes)
    if len(raw) != HASH_NBYTES * len(hashes):
        raise ValueError(f"block hashes must be {HASH_NBYTES} bytes each")
    return split_raw(raw)


def split_raw(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``split_hashes`` of hashes already joined."""
    keys = np.frombuffer(raw, _KEY)
    return keys["k0"], keys["k1"]


class BlockTable:
    """Block hash -> block id (slot) -> row id. Not thread-safe (the index holds its lock)."""

    def __init__(self, capacity: int = _MIN_CAPACITY) -> None:
        self._alloc(max(_MIN_CAPACITY, 1 << (max(1, capacity) - 1).bit_length()))
        self.num_held = 0  # slots with a row (the index keeps it as rows change)
        self.generation = 0  # changes when the table is rebuilt (every id changes)

    def _alloc(self, capacity: int) -> None:
        self.capacity = capacity
        self.slots = np.zeros(capacity, _RECORD)  # every slot FREE
        self.row_of = self.slots["row"]  # a view: block id -> row id
        self.num_used = 0  # slots not FREE (at most: a slot claimed twice counts twice)

    @property
    def nbytes(self) -> int:
        return self.slots.nbytes

    def find(self, hashes: Sequence[bytes], insert: bool = False) -> np.ndarray:
        """The id of each hash (intp); with ``insert``, a hash not known yet gets a slot (row
        ``EMPTY_ROW``), else its id is -1. Equal hashes get the same id."""
        return self.find_keys(*split_hashes(hashes), insert=insert)

    def find_keys(self, k0: np.ndarray, k1: np.ndarray, insert: bool = False) -> np.ndarray:
        """``find`` of keys from ``split_hashes``."""
        if insert and (self.num_used + len(k0)) > _MAX_LOAD * self.capacity:
            self._rebuild(self.num_used + len(k0))
        ids, _, free = self._probe(k0, k1)
        if insert:
            self._insert(k0, k1, ids, free)
        return ids

    def rows(self, hashes: Sequence[bytes]) -> np.ndarray:
        """The row id of each hash (``EMPTY_ROW`` when no worker holds it)."""
        return self._probe(*split_hashes(hashes))[1]

    def _probe(self, k0: np.ndarray, k1: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(id, row id, free slot) of each key: a key found has its id and row and free slot
        -1; a key not found has id -1, row ``EMPTY_ROW`` and the free slot its probe ended at."""
        return self._scan(k0, k1, self._home(k0))

    def _home(self, k0: np.ndarray) -> np.ndarray:
        """A key's home slot: the top bits of its first 8 bytes (keys sorted by those bytes
        are probed in slot order)."""
        shift = np.uint64(64 - (self.capacity.bit_length() - 1))
        return (k0 >> shift).astype(np.intp)

    def _scan(self, k0: np.ndarray, k1: np.ndarray, pos: np.ndarray,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``_probe`` from slots ``pos`` on, in rounds until each key is found or a free slot:
        the first looks at one slot per key (most keys end there; a window costs several times
        more per key) or, for a few keys, at four (a round costs mostly numpy's per-call
        overhead then: one round more costs more than the wider window), the later ones at
        ``_WINDOW`` slots per key left."""
        width = 1 if len(k0) > _FEW_KEYS else 4
        ends, hit, at, got = self._round(k0, k1, pos, width)
        ids = np.where(hit, at, -1)
        rows = np.where(hit, got, EMPTY_ROW)
        free = np.where(ends & ~hit, at, -1)
        todo = np.flatnonzero(~ends)
        pos = pos[todo] + width
        while len(todo):
            ends, hit, at, got = self._round(k0[todo], k1[todo], pos, _WINDOW)
            ids[todo] = np.where(hit, at, -1)
            rows[todo] = np.where(hit, got, EMPTY_ROW)
            free[todo] = np.where(ends & ~hit, at, -1)
            todo, pos = todo[~ends], pos[~ends] + _WINDOW
        return ids, rows, free

    def _round(self, k0: np.ndarray, k1: np.ndarray, pos: np.ndarray, width: int,
               ) -> tuple[np.ndarray, ...]:
        """One probe round over ``width`` slots from ``pos``: per key, whether it ended (found,
        or a free slot), whether found, the slot it ended at and that slot's row."""
        mask = self.capacity - 1
        if width == 1:
            at = pos & mask
            rec = np.take(self.slots, at)
            got = rec["row"]
            ends = (got == FREE) | ((rec["k0"] == k0) & (rec["k1"] == k1))
            return ends, ends & (got != FREE), at, got
        window = (pos[:, None] + _STEPS[:width]) & mask  # [key, step]
        rec = np.take(self.slots, window)
        row = rec["row"]
        stop = (row == FREE) | ((rec["k0"] == k0[:, None]) & (rec["k1"] == k1[:, None]))
        at = (pos + stop.argmax(axis=1)) & mask  # the first slot it stops at
        got = self.row_of[at]
        ends = stop.any(axis=1)
        return ends, ends & (got != FREE), at, got

    def _insert(self, k0: np.ndarray, k1: np.ndarray, ids: np.ndarray, free: np.ndarray) -> None:
        """Give the keys not found (``ids`` -1) the free slots their probes ended at. When
        several keys claim one slot, the one written last holds it and the others probe on
        from there (equal keys all hold it: they are one block)."""
        new = np.flatnonzero(ids < 0)
        while len(new):
            claim = free[new]
            slots = self.slots
            slots["k0"][claim] = k0[new]
            slots["k1"][claim] = k1[new]
            slots["row"][claim] = EMPTY_ROW
            back = np.take(slots, claim)
            won = (back["k0"] == k0[new]) & (back["k1"] == k1[new])
            self.num_used += int(won.sum())  # (equal keys in ``new`` count more than once)
            ids[new[won]] = claim[won]
            new = new[~won]
            if len(new):
                ids[new], _, free[new] = self._scan(k0[new], k1[new], claim[~won] + 1)
                new = new[ids[new] < 0]

    @staticmethod
    def unique_ids(ids: np.ndarray) -> np.ndarray:
        """``ids`` sorted, without repeats (sorted ids also touch the arrays in order)."""
        if len(ids) < 2:
            return ids
        ids = np.sort(ids)
        repeat = ids[1:] == ids[:-1]
        return ids[np.concatenate([[True], ~repeat])] if repeat.any() else ids

    def held_ids(self) -> np.ndarray:
        """Ids of every held block."""
        return np.flatnonzero(self.row_of > EMPTY_ROW)

    def _rebuild(self, need: int) -> None:
        """A fresh table for the held blocks and ``need`` slots in use, tombstones dropped.
        The held blocks are laid out at once: sorted by home slot, each goes to the first slot
        at or after its home past the one before it (what inserting them one by one in that
        order gives); the few pushed past the end wrap around through ``_probe``."""
        held = self.held_ids()
        old = self.slots[held]
        capacity = _MIN_CAPACITY
        while capacity * _TARGET_LOAD < max(len(held), need - self.num_used + len(held)):
            capacity *= 2
        self._alloc(capacity)
        self.generation += 1
        home = self._home(old["k0"])
        order = np.argsort(home, kind="stable")
        old, home = old[order], home[order]
        n = np.arange(len(home))
        at = n + np.maximum.accumulate(home - n) if len(home) else n
        fits = at < capacity
        self.slots[at[fits]] = old[fits]
        self.num_used = int(fits.sum())
        if not fits.all():
            rest = old[~fits]
            ids = self.find_keys(rest["k0"], rest["k1"], insert=True)
            self.row_of[ids] = rest["row"]
