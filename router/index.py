"""The router's global view of which worker holds which block, in which tiers.

One index over all workers. Each worker owns a slot, a bit position; one dict maps a block hash
to its row: the bit sets of the workers holding the block in HBM, in host memory and on disk
(``block_rows``: rows are interned, so an event is a lookup and a store per block). A block
can sit in several tiers of one worker at once (HBM and disk): removing the HBM copy leaves
the disk one.

A placement walks the prompt's blocks once (``residency``): it AND-s the set of workers still
holding the prefix block by block, so the cost per block does not grow with the number of
workers; a worker's leading run ends where its bit drops out. Workers whose leading blocks sit
in the same tiers come back as one ``ResidencyGroup``, so the cost model evaluates every
distinct residency once, however many workers share it.

There is no per-worker copy of the blocks (a set per worker halved the event rate measured on
``strata bench router``'s event stream); per-worker block counts are kept as events apply.
Forgetting a dead worker takes its slot out of the live set at once (placement no longer sees
it) and leaves its bits to be cleared from the rows a bounded number at a time, by later
event batches (``block_rows.Scrubber``; ``compact`` finishes it); a retired slot is reused
only once that is done. ``replace_worker`` (a resync after a worker or router restart) retires
the worker's slot the same way and stores its blocks under a fresh one, atomically under the
lock. Thread-safe: events arrive from the event poller while request threads query.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, compress, repeat
from operator import is_not
from typing import Protocol

from kvstore.keys import BlockHash
from router.block_rows import (
    EMPTY,
    NUM_TIERS,
    Row,
    RowTable,
    Scrubber,
    apply_op,
    count_changes,
    merge_ops,
    op_code,
)
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
    # rows cleared of retired slots' bits per event batch while a scrub is under way
    SCRUB_ROWS_PER_BATCH = 4096
    WALK_CHUNK = 256  # blocks looked up at a time by ``residency``

    def __init__(self, max_groups: int = 32) -> None:
        self.max_groups = max_groups  # distinct residencies refined as bit sets (ResidencyWalk)
        self._lock = threading.Lock()
        self._slot_of: dict[str, int] = {}  # worker_id -> slot
        self._worker_at: list[str] = []  # slot -> worker_id ("": free or retired)
        self._free_slots: list[int] = []  # heap: the lowest free slot is reused first
        self._all = 0  # bit set of every registered worker
        self._rows: dict[bytes, Row] = {}  # block_hash -> its holders (never EMPTY)
        self._table = RowTable()
        self._counts: dict[int, list[int]] = {}  # slot -> blocks in [any tier, device, host, disk]
        self._scrub = Scrubber()

    # ---- membership ----------------------------------------------------------------------
    def add_worker(self, worker_id: str) -> None:
        with self._lock:
            self._slot_locked(worker_id)

    def remove_worker(self, worker_id: str) -> int:
        """Forget a worker (it died or left); returns how many blocks it held."""
        with self._lock:
            slot = self._slot_of.pop(worker_id, None)
            return 0 if slot is None else self._retire_locked(slot)

    def replace_worker(self, worker_id: str, blocks: Mapping[str, Iterable[BlockHash]]) -> None:
        """Resync: ``worker_id`` now holds exactly ``blocks`` (tier -> hashes), atomically."""
        batch = [(op_code(_tier_num(tier), True), list(hashes)) for tier, hashes in blocks.items()]
        with self._lock:
            old = self._slot_of.pop(worker_id, None)
            if old is not None:
                self._retire_locked(old)
            self._apply_batch_locked(self._slot_locked(worker_id), batch)

    def compact(self) -> None:
        """Finish clearing the bits of removed workers now (later event batches would)."""
        with self._lock:
            while self._scrub.busy:
                self._free_locked(self._scrub.step(self._rows, self._table, None))

    def workers(self) -> list[str]:
        with self._lock:
            return sorted(self._slot_of)

    def num_blocks(self, worker_id: str, tier: str | None = None) -> int:
        """Blocks ``worker_id`` holds (in ``tier``, or in any tier)."""
        col = 0 if tier is None else 1 + _tier_num(tier)
        with self._lock:
            slot = self._slot_of.get(worker_id)
            return 0 if slot is None else self._counts[slot][col]

    # ---- events --------------------------------------------------------------------------
    def apply(self, worker_id: str, event: StoreEventLike) -> None:
        """Apply one store event of ``worker_id`` (registering the worker if new)."""
        self.apply_many(worker_id, (event,))

    def apply_many(self, worker_id: str, events: Iterable[StoreEventLike]) -> None:
        """Apply a batch of store events of ``worker_id`` in order (registering the worker if
        new). A bad event raises ValueError before any of the batch is applied."""
        batch = [(op_code(_tier_num(e.tier), _is_stored(e.kind)), e.block_hashes) for e in events]
        with self._lock:
            self._apply_batch_locked(self._slot_locked(worker_id), batch)
            if self._scrub.busy:
                freed = self._scrub.step(self._rows, self._table, self.SCRUB_ROWS_PER_BATCH)
                self._free_locked(freed)

    # ---- queries -------------------------------------------------------------------------
    def residency(self, hashes: Sequence[BlockHash]) -> list[ResidencyGroup]:
        """Every worker holding a leading run of ``hashes``, grouped by identical residency
        (the best tier of each of its leading blocks); workers holding none are left out."""
        n = len(hashes)
        with self._lock:
            if not n or not self._all:
                return []
            get = self._rows.get
            walk = ResidencyWalk(self._all, self.max_groups)
            prev: Row | None = None  # the row of the block before this chunk
            for start in range(0, n, self.WALK_CHUNK):  # chunks: a walk that ends stops early
                rows = list(map(get, hashes[start : start + self.WALK_CHUNK], repeat(EMPTY)))
                # rows are interned: only where the row object changes can a leading run end
                for j in compress(range(len(rows)), map(is_not, rows, chain((prev,), rows))):
                    row = rows[j]
                    if not walk.step(start + j, row.device, row.host, row.disk):
                        break
                else:
                    prev = rows[-1]
                    continue
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
        self._counts[slot] = [0] * (1 + NUM_TIERS)
        self._all |= 1 << slot
        return slot

    def _retire_locked(self, slot: int) -> int:
        """Take ``slot`` out of the live set; its bits are scrubbed later. Returns its blocks."""
        num = self._counts.pop(slot)[0]
        self._worker_at[slot] = ""
        self._all &= ~(1 << slot)
        if num:
            self._scrub.pending |= 1 << slot
        else:
            heapq.heappush(self._free_slots, slot)
        return num

    def _free_locked(self, slots: int) -> None:
        for slot in slots_of(slots):
            heapq.heappush(self._free_slots, slot)

    def _apply_batch_locked(self, slot: int, batch: Sequence[tuple[int, Sequence[bytes]]]) -> None:
        bit, counts = 1 << slot, self._counts[slot]
        for code, hashes in merge_ops(batch):
            runs = apply_op(self._rows, self._table, code, bit, hashes)
            for i, change in enumerate(count_changes(runs, bit)):
                counts[i] += change


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
