"""The router's global view of which worker holds which block, in which tiers.

One index over all workers. Each worker owns a slot, a bit position; one dict maps a block hash
to its row: the bit sets (Python ints) of the workers holding the block in HBM, in host memory
and on disk. Rows are interned (every block with the same holders shares one row object), so
an event turns each distinct old row into its new row once, and the per-block work is a few
dictionary operations that run in C. A block can sit in several tiers of one worker at once
(HBM and disk): removing the HBM copy leaves the disk one.

A placement walks the prompt's blocks once (``residency``): it AND-s the set of workers still
holding the prefix block by block, so the cost per block does not grow with the number of
workers; a worker's leading run ends where its bit drops out. Workers whose leading blocks sit
in the same tiers come back as one ``ResidencyGroup``, so the cost model evaluates every
distinct residency once, however many workers share it.

Each worker also keeps one set of hashes per tier: forgetting a dead worker touches only its
own entries, and ``replace_worker`` (a resync after a worker or router restart) swaps them
atomically. Thread-safe: events arrive from the event poller while request threads query.
"""

from __future__ import annotations

import heapq
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, compress, repeat
from operator import is_, is_not
from typing import Protocol

from kvstore.keys import BlockHash
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
        self._rows: dict[bytes, _Row] = {}  # block_hash -> its holders (never EMPTY)
        self._interned: weakref.WeakValueDictionary[tuple[int, ...], _Row] = (
            weakref.WeakValueDictionary()
        )
        # per slot: per tier, the hashes that worker holds there
        self._blocks: list[tuple[set[bytes], ...]] = []

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
            num = self._clear_locked(slot)
            self._worker_at[slot] = ""
            self._all &= ~(1 << slot)
            heapq.heappush(self._free_slots, slot)
            return num

    def replace_worker(self, worker_id: str, blocks: Mapping[str, Iterable[BlockHash]]) -> None:
        """Resync: ``worker_id`` now holds exactly ``blocks`` (tier -> hashes), atomically."""
        tiers = [(_tier_num(tier), list(hashes)) for tier, hashes in blocks.items()]
        with self._lock:
            slot = self._slot_locked(worker_id)
            self._clear_locked(slot)
            mine = self._blocks[slot]
            for t, hashes in tiers:
                self._store(mine[t], self._transitions(t, slot, True), hashes)

    def workers(self) -> list[str]:
        with self._lock:
            return sorted(self._slot_of)

    def num_blocks(self, worker_id: str, tier: str | None = None) -> int:
        t = None if tier is None else _tier_num(tier)
        with self._lock:
            slot = self._slot_of.get(worker_id)
            if slot is None:
                return 0
            mine = self._blocks[slot]
            return len(mine[t]) if t is not None else len(set().union(*mine))

    # ---- events --------------------------------------------------------------------------
    def apply(self, worker_id: str, event: StoreEventLike) -> None:
        """Apply one store event of ``worker_id`` (registering the worker if new)."""
        self.apply_many(worker_id, (event,))

    def apply_many(self, worker_id: str, events: Iterable[StoreEventLike]) -> None:
        with self._lock:
            slot = self._slot_locked(worker_id)
            mine = self._blocks[slot]
            memo: dict[tuple[int, bool], _Transitions] = {}
            for event in events:
                t = _tier_num(event.tier)
                stored = event.kind == EVENT_STORED
                if stored or event.kind == EVENT_REMOVED:
                    trans = memo.get((t, stored))
                    if trans is None:
                        trans = memo[(t, stored)] = self._transitions(t, slot, stored)
                    if stored:
                        self._store(mine[t], trans, event.block_hashes)
                    else:
                        self._discard(mine[t], trans, event.block_hashes)
                else:
                    raise ValueError(
                        f"unknown event kind {event.kind!r}: expected "
                        f"{EVENT_STORED!r} or {EVENT_REMOVED!r}"
                    )

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
            mine = self._blocks[slot]
            out: list[str] = []
            for h in hashes:
                tier = next((TIERS[t] for t in range(len(TIERS)) if h in mine[t]), None)
                if tier is None:
                    break
                out.append(tier)
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
            self._blocks.append(tuple(set() for _ in TIERS))
        self._slot_of[worker_id] = slot
        self._all |= 1 << slot
        return slot

    def _clear_locked(self, slot: int) -> int:
        """Drop every entry of ``slot``; returns how many distinct blocks it held."""
        mine = self._blocks[slot]
        num = len(set().union(*mine))
        for t, hashes in enumerate(mine):
            self._discard(hashes, self._transitions(t, slot, False), hashes)
        return num

    def _transitions(self, t: int, slot: int, stored: bool) -> _Transitions:
        return _Transitions(self._intern, t, 1 << slot, stored)

    def _intern(self, masks: tuple[int, ...]) -> _Row:
        if not any(masks):
            return EMPTY
        row = self._interned.get(masks)
        if row is None:
            row = self._interned[masks] = _Row(*masks)
        return row

    def _store(self, mine: set[bytes], trans: _Transitions, hashes: Sequence[bytes]) -> None:
        """Add a worker's bit to the rows of ``hashes`` (the loops run in C: map/zip/update)."""
        mine.update(hashes)
        rows = self._rows
        rows.update(zip(hashes, map(trans.__getitem__, map(rows.get, hashes, repeat(EMPTY)))))

    def _discard(self, mine: set[bytes], trans: _Transitions, hashes: Iterable[bytes]) -> None:
        """Clear a worker's bit from those of ``hashes`` it holds; a row left empty goes."""
        gone = list(mine.intersection(hashes))
        if not gone:
            return
        if len(gone) == len(mine):
            mine.clear()
        else:
            mine.difference_update(gone)
        rows = self._rows
        new = list(map(trans.__getitem__, map(rows.__getitem__, gone)))
        rows.update(zip(gone, new))
        for h in compress(gone, map(is_, new, repeat(EMPTY))):
            del rows[h]


class _Row:
    """The workers holding one block, a bit set per tier. Interned and never changed: equal
    rows are one object, hashed by identity."""

    __slots__ = ("device", "host", "disk", "__weakref__")

    def __init__(self, device: int, host: int, disk: int) -> None:
        self.device, self.host, self.disk = device, host, disk

    def masks(self) -> list[int]:
        return [self.device, self.host, self.disk]


EMPTY = _Row(0, 0, 0)


class _Transitions(dict[_Row, _Row]):
    """Old row -> new row for one event kind of one worker in one tier; a row not seen yet
    in this batch of events is computed (and interned) on first use."""

    def __init__(self, intern: Callable[[tuple[int, ...]], _Row], t: int, bit: int,
                 stored: bool) -> None:
        super().__init__()
        self._intern, self._t, self._bit, self._stored = intern, t, bit, stored

    def __missing__(self, old: _Row) -> _Row:
        masks = old.masks()
        masks[self._t] = masks[self._t] | self._bit if self._stored else masks[self._t] & ~self._bit
        new = self[old] = self._intern(tuple(masks))
        return new


def tier_bit(tier: str) -> int:
    """``1 << position`` of ``tier`` in TIERS; ValueError naming the tiers otherwise."""
    return 1 << _tier_num(tier)


def _tier_num(tier: str) -> int:
    t = _TIER_NUM.get(tier)
    if t is None:
        raise ValueError(f"unknown tier {tier!r}: expected one of {TIERS}")
    return t
