"""The router's global view of which worker holds which block, in which tiers.

One index over all workers. Each worker owns a slot, a bit position; one dict maps a block hash
to its row: the bit sets of the workers holding the block in HBM, in host memory and on disk
(``block_rows``: rows are interned, so an event is two dictionary lookups and a store per
block). A block can sit in several tiers of one worker at once (HBM and disk): removing the
HBM copy leaves the disk one.

A placement walks the prompt's blocks once (``residency``): it AND-s the set of workers still
holding the prefix block by block, so the cost per block does not grow with the number of
workers; a worker's leading run ends where its bit drops out. Workers whose leading blocks sit
in the same tiers come back as one ``ResidencyGroup``, so the cost model evaluates every
distinct residency once, however many workers share it.

There is no per-worker copy of the blocks: keeping one (a set per worker) halved the event rate
measured on ``strata bench router``'s event stream. A dead worker leaves placement at once
(its slot leaves the live set) and its bits leave the rows in one pass over them (measured
in the bench); ``replace_worker`` (a resync after a worker or router restart) does the same
and stores the worker's blocks anew, atomically under the lock. Per-worker block counts come
from one count of the rows, kept until the next change. Thread-safe: events arrive from the
event poller while request threads query.
"""

from __future__ import annotations

import heapq
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, compress, repeat
from operator import is_not
from typing import Protocol

from kvstore.keys import BlockHash
from router.block_rows import DROP_ALL, EMPTY, NUM_TIERS, Row, RowTable, op_code
from router.residency import ResidencyGroup, ResidencyWalk, slots_of

# Fastest first: a block's best tier is the first of these it is in.
TIERS = ("device", "host", "disk")
_TIER_NUM = {tier: i for i, tier in enumerate(TIERS)}
EVENT_STORED = "stored"
EVENT_REMOVED = "removed"

__all__ = ["TIERS", "BlockEvent", "GlobalBlockIndex", "ResidencyGroup", "tier_bit"]


class StoreEventLike(Protocol):
    @property
    def kind(self) -> str: ...

    @property
    def tier(self) -> str: ...

    @property
    def block_hashes(self) -> Sequence[bytes]: ...


@dataclass(frozen=True)
class BlockEvent:
    kind: str  # EVENT_STORED or EVENT_REMOVED
    tier: str  # one of TIERS
    block_hashes: tuple[bytes, ...]


class GlobalBlockIndex:
    def __init__(self, max_groups: int = 32) -> None:
        self.max_groups = max_groups  # distinct residencies refined as bit sets (ResidencyWalk)
        self._lock = threading.Lock()
        self._slot_of: dict[str, int] = {}  # worker_id -> slot
        self._worker_at: list[str] = []  # slot -> worker_id ("": a free slot)
        self._free_slots: list[int] = []  # heap: the lowest free slot is reused first
        self._all = 0  # bit set of every registered worker
        self._rows: dict[bytes, Row] = {}  # block_hash -> its holders (never EMPTY)
        self._table = RowTable()
        self._version = 0  # bumped by every change
        self._counts: tuple[int, dict[int, list[int]]] = (-1, {})  # version, slot -> counts

    # ---- membership ----------------------------------------------------------------------
    def add_worker(self, worker_id: str) -> None:
        with self._lock:
            self._slot_locked(worker_id)

    def remove_worker(self, worker_id: str) -> int:
        """Forget a worker (it died or left); returns how many blocks it held."""
        with self._lock:
            slot = self._slot_of.pop(worker_id, None)
            if slot is None:
                return 0
            num = self._counts_locked().get(slot, [0])[0]
            self._drop_slot_locked(slot)
            self._worker_at[slot] = ""
            self._all &= ~(1 << slot)
            heapq.heappush(self._free_slots, slot)
            return num

    def replace_worker(self, worker_id: str, blocks: Mapping[str, Iterable[BlockHash]]) -> None:
        """Resync: ``worker_id`` now holds exactly ``blocks`` (tier -> hashes), atomically."""
        batch = [(op_code(_tier_num(tier), True), list(hashes)) for tier, hashes in blocks.items()]
        with self._lock:
            slot = self._slot_locked(worker_id)
            self._drop_slot_locked(slot)
            for code, hashes in batch:
                self._apply_locked(slot, code, hashes)

    def workers(self) -> list[str]:
        with self._lock:
            return sorted(self._slot_of)

    def num_blocks(self, worker_id: str, tier: str | None = None) -> int:
        """Blocks ``worker_id`` holds (in ``tier``, or in any tier)."""
        col = 0 if tier is None else 1 + _tier_num(tier)
        with self._lock:
            slot = self._slot_of.get(worker_id)
            return 0 if slot is None else self._counts_locked().get(slot, [0] * 4)[col]

    # ---- events --------------------------------------------------------------------------
    def apply(self, worker_id: str, event: StoreEventLike) -> None:
        """Apply one store event of ``worker_id`` (registering the worker if new)."""
        self.apply_many(worker_id, (event,))

    def apply_many(self, worker_id: str, events: Iterable[StoreEventLike]) -> None:
        """Apply a batch of store events of ``worker_id`` in order (registering the worker if
        new). A bad event raises ValueError before any of the batch is applied."""
        batch = [(op_code(_tier_num(e.tier), _is_stored(e.kind)), e.block_hashes) for e in events]
        with self._lock:
            slot = self._slot_locked(worker_id)
            for code, hashes in batch:
                self._apply_locked(slot, code, hashes)

    # ---- queries -------------------------------------------------------------------------
    def residency(self, hashes: Sequence[BlockHash]) -> list[ResidencyGroup]:
        """Every worker holding a leading run of ``hashes``, grouped by identical residency
        (the best tier of each of its leading blocks); workers holding none are left out."""
        n = len(hashes)
        with self._lock:
            if not n or not self._all:
                return []
            rows = list(map(self._rows.get, hashes, repeat(EMPTY)))
            walk = ResidencyWalk(self._all, self.max_groups)
            # rows are interned: only where the row object changes can a leading run end
            changes = compress(range(1, n), map(is_not, rows[1:], rows[:-1]))
            for i in chain((0,), changes):
                row = rows[i]
                if not walk.step(i, row.device, row.host, row.disk):
                    break
            found = walk.finish(n)
            names = self._worker_at
            return [
                ResidencyGroup(
                    tuple(map(names.__getitem__, slots_of(mask))),
                    tuple((TIERS[t], num) for t, num in runs),
                )
                for mask, runs in found
            ]

    def leading_lengths(self, hashes: Sequence[BlockHash]) -> dict[str, int]:
        """Length of the leading run of every worker holding at least the first block."""
        return {w: g.num_blocks for g in self.residency(hashes) for w in g.worker_ids}

    def leading_tiers(self, worker_id: str, hashes: Sequence[BlockHash]) -> list[str]:
        """Best tier of each block of the longest leading run ``worker_id`` holds."""
        with self._lock:
            slot = self._slot_of.get(worker_id)
            if slot is None:
                return []
            bit = 1 << slot
            out: list[str] = []
            for h in hashes:
                row = self._rows.get(h, EMPTY)
                if not row.held & bit:
                    break
                out.append("device" if row.device & bit else "host" if row.host & bit else "disk")
            return out

    def prefix_hits(self, worker_id: str, hashes: Sequence[BlockHash]) -> dict[str, int]:
        """Blocks of the leading held prefix, counted by their best tier (every tier present)."""
        hits = dict.fromkeys(TIERS, 0)
        for tier in self.leading_tiers(worker_id, hashes):
            hits[tier] += 1
        return hits

    def all_prefix_hits(self, hashes: Sequence[BlockHash]) -> dict[str, dict[str, int]]:
        """``prefix_hits`` of every known worker (one walk over ``hashes``)."""
        out = {w: dict.fromkeys(TIERS, 0) for w in self.workers()}
        for group in self.residency(hashes):
            for w in group.worker_ids:
                for tier, num in group.runs:
                    out[w][tier] += num
        return out

    # ---- internals (lock held) -----------------------------------------------------------
    def _slot_locked(self, worker_id: str) -> int:
        slot = self._slot_of.get(worker_id)
        if slot is not None:
            return slot
        if self._free_slots:
            slot = heapq.heappop(self._free_slots)
            self._worker_at[slot] = worker_id
        else:
            slot = len(self._worker_at)
            self._worker_at.append(worker_id)
        self._slot_of[worker_id] = slot
        self._all |= 1 << slot
        return slot

    def _apply_locked(self, slot: int, code: int, hashes: Sequence[bytes]) -> None:
        """Operation ``code`` (one tier, stored or removed) of worker ``slot`` on ``hashes``.

        The hot loop of the index: a lookup and a store per block. The new row of each
        distinct old row is computed once, and neighbouring blocks mostly share their row, so
        the last one is checked by identity before the dict of them."""
        self._version += 1
        bit, rows, table = 1 << slot, self._rows, self._table
        get = rows.get
        new_of: dict[Row, Row] = {}
        last_old = last_new = EMPTY
        if code & DROP_ALL:  # removed: a block nobody holds any more leaves
            for h in hashes:
                old = get(h)
                if old is None:
                    continue
                if old is not last_old:
                    try:
                        new = new_of[old]
                    except KeyError:
                        new = new_of[old] = table.apply(old, code, bit)
                    last_old, last_new = old, new
                if last_new is EMPTY:
                    del rows[h]
                else:
                    rows[h] = last_new
        else:
            last_new = table.apply(EMPTY, code, bit)
            for h in hashes:
                old = get(h, EMPTY)
                if old is not last_old:
                    try:
                        new = new_of[old]
                    except KeyError:
                        new = new_of[old] = table.apply(old, code, bit)
                    last_old, last_new = old, new
                rows[h] = last_new

    def _drop_slot_locked(self, slot: int) -> None:
        """Clear ``slot``'s bit from every row: one pass over the rows."""
        bit = 1 << slot
        affected = {row for row in self._table.rows() if row.held & bit}
        if affected:
            keys = [h for h, row in self._rows.items() if row in affected]
            self._apply_locked(slot, DROP_ALL, keys)

    def _counts_locked(self) -> dict[int, list[int]]:
        """slot -> [blocks in any tier, in device, host, disk], counted once per version."""
        version, counts = self._counts
        if version == self._version:
            return counts
        counts = {}
        for row, num in Counter(self._rows.values()).items():
            for t, mask in enumerate((row.held, row.device, row.host, row.disk)):
                for s in slots_of(mask):
                    counts.setdefault(s, [0] * (1 + NUM_TIERS))[t] += num
        self._counts = (self._version, counts)
        return counts


def tier_bit(tier: str) -> int:
    """``1 << position`` of ``tier`` in TIERS; ValueError naming the tiers otherwise."""
    return 1 << _tier_num(tier)


def _tier_num(tier: str) -> int:
    t = _TIER_NUM.get(tier)
    if t is None:
        raise ValueError(f"unknown tier {tier!r}: expected one of {TIERS}")
    return t


def _is_stored(kind: str) -> bool:
    if kind == EVENT_STORED:
        return True
    if kind == EVENT_REMOVED:
        return False
    raise ValueError(f"unknown event kind {kind!r}: expected {EVENT_STORED!r} or {EVENT_REMOVED!r}")
