"""The router's global view of which worker holds which block, in which tiers.

One index over all workers, in numpy arrays. Each worker owns a slot, a bit position. A block
hash is interned to a block id (``block_table``: an open-addressing table of 96 bits of the
hashes); per block id the table keeps the id of its row (``block_rows``: the bit sets of the
workers holding the block in HBM, in host memory and on disk, interned, so blocks with the
same holders share one row). A worker's event batch is a few vectorized passes
(``block_events``): its hashes looked up at once, its events folded per block, each distinct
(old row, event) pair turned into its new row once. A block can sit in several tiers of one
worker at once (HBM and disk): removing the HBM copy leaves the disk one.

A placement walks the prompt's blocks (``walk``, ``residency``): their row ids are gathered a
chunk at a time and only the change points are looked at; the walk stops as soon as no worker
it follows holds the prefix (``router.residency``).

Per-worker block counts are kept as events apply. Forgetting a dead worker takes its slot out
of the live set at once (queries no longer see it) and leaves its bits to be cleared from the
rows a bounded number at a time, by later event batches (``block_rows.Scrubber``; ``compact``
finishes it); a retired slot is reused only once that is done. Each worker's incarnation
(epoch and batch numbers, ``router.incarnation``) decides which batches and snapshots apply:
``apply_batch`` and ``replace_worker`` (a resync) are atomic under the lock, and the stale ones
(an older epoch, a batch the snapshot already holds) never apply. Thread-safe: events arrive
from the event poller while request threads query.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np

from kvstore.keys import BlockHash
from proto.vocab import EventKind, Tier
from proto.worker_api import BlockEvent
from router.block_events import Batch, EventApplier
from router.block_rows import NUM_TIERS, RowTable, Scrubber, op_code, slot_word
from router.block_table import BlockTable
from router.incarnation import Action, Incarnations
from router.residency import Residency, ResidencyGroup, ResidencyWalk

# Fastest first: a block's best tier is the first of these it is in.
TIERS: tuple[Tier, ...] = tuple(Tier)
_TIER_NUM = {tier: i for i, tier in enumerate(TIERS)}

__all__ = ["TIERS", "GlobalBlockIndex", "ResidencyGroup", "tier_bit"]



class EventBatchLike(Protocol):
    @property
    def epoch(self) -> int: ...

    @property
    def seq(self) -> int: ...

    @property
    def lost(self) -> bool: ...

    @property
    def events(self) -> Sequence[BlockEvent]: ...


class GlobalBlockIndex:
    SCRUB_ROWS_PER_BATCH = 256  # rows cleared of retired slots' bits per event batch
    FIRST_CHUNK = 32  # blocks the walk looks up first; each later chunk 64x the last
    FEW_POINTS = 16  # change points up to which a walk splits groups of bit sets

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slot_of: dict[str, int] = {}  # worker_id -> slot
        self._worker_at: list[str] = []  # slot -> worker_id ("": free or retired)
        self._free_slots: list[int] = []  # heap: the lowest free slot is reused first
        self._live = np.zeros(1, np.uint64)  # bit set of every registered worker
        self._table = BlockTable()
        self._rows = RowTable()
        self._counts = np.zeros((64, 1 + NUM_TIERS), np.int64)  # slot -> [any, HBM, host, disk]
        self._events = EventApplier(self._table, self._rows, self._counts)
        self._scrub = Scrubber()
        self._incarnations = Incarnations()
        self.layout_version = 0  # changes whenever a worker gets or leaves a slot

    # ---- membership ----------------------------------------------------------------------
    def add_worker(self, worker_id: str) -> None:
        with self._lock:
            self._slot_locked(worker_id)

    def remove_worker(self, worker_id: str) -> int:
        """Forget a worker (it died or left); returns how many blocks it held. Its current
        incarnation's batches apply no more."""
        with self._lock:
            self._incarnations.drop(worker_id)
            slot = self._slot_of.pop(worker_id, None)
            return 0 if slot is None else self._retire_locked(slot)

    def replace_worker(self, worker_id: str, blocks: Mapping[str, Iterable[BlockHash]],
                       epoch: int | None = None, seq: int = 0) -> bool:
        """Resync: ``worker_id`` now holds exactly ``blocks`` (tier -> hashes), atomically.
        With an epoch, the snapshot ``(epoch, seq)`` applies only if no newer batch has
        (``router.incarnation``); False when it did not apply (take another one)."""
        batch = [(op_code(_tier_num(tier), True), list(hashes)) for tier, hashes in blocks.items()]
        with self._lock:
            if epoch is not None and not self._incarnations.snapshot(worker_id, epoch, seq):
                return False
            old = self._slot_of.pop(worker_id, None)
            if old is not None:
                self._retire_locked(old)
            self._events.apply(self._slot_locked(worker_id), batch)
            return True

    def compact(self) -> None:
        """Finish clearing the bits of removed workers now (later event batches would)."""
        with self._lock:
            while self._scrub.busy:
                self._free_locked(self._scrub.step(self._rows, self._table, None))

    def workers(self) -> list[str]:
        with self._lock:
            return sorted(self._slot_of)

    def in_sync(self, worker_id: str) -> bool:
        """False while the worker's entries wait for a snapshot (``replace_worker``)."""
        with self._lock:
            return self._incarnations.in_sync(worker_id)

    def num_blocks(self, worker_id: str, tier: str | None = None) -> int:
        """Blocks ``worker_id`` holds (in ``tier``, or in any tier)."""
        col = 0 if tier is None else 1 + _tier_num(tier)
        with self._lock:
            slot = self._slot_of.get(worker_id)
            return 0 if slot is None else int(self._counts[slot, col])

    def held_counts(self, slots: np.ndarray) -> np.ndarray:
        """Blocks held (any tier) by the workers at ``slots`` (-1: none, 0)."""
        with self._lock:
            counts = self._counts[np.maximum(slots, 0), 0]
        return np.where(slots >= 0, counts, 0)

    def slots(self, worker_ids: Sequence[str]) -> np.ndarray:
        """The slot of each worker (-1 for one not in the index)."""
        with self._lock:
            get = self._slot_of.get
            return np.array([get(w, -1) for w in worker_ids], np.int64)

    def __len__(self) -> int:
        """Blocks some worker holds."""
        return self._table.num_held

    @property
    def nbytes(self) -> int:
        """Bytes of the index's arrays and tables (per-worker bookkeeping left out)."""
        return self._table.nbytes + self._rows.nbytes + self._counts.nbytes

    # ---- events --------------------------------------------------------------------------
    def apply(self, worker_id: str, event: BlockEvent) -> None:
        """Apply one store event of ``worker_id`` (registering the worker if new)."""
        self.apply_many(worker_id, (event,))

    def apply_many(self, worker_id: str, events: Iterable[BlockEvent]) -> None:
        """Apply a batch of store events of ``worker_id`` in order (registering the worker if
        new), with no incarnation check. A bad event raises ValueError before any of the batch
        is applied."""
        batch = [(op_code(_tier_num(e.tier), _is_stored(e.kind)), e.block_hashes) for e in events]
        with self._lock:
            self._events.apply(self._slot_locked(worker_id), batch)
            self._scrub_locked()

    def apply_batch(self, worker_id: str, batch: EventBatchLike) -> bool:
        """Apply a numbered event batch of one incarnation of ``worker_id`` (or ignore it: see
        ``router.incarnation``). Returns False when the worker's entries wait for a snapshot."""
        ops: Batch = [(op_code(_tier_num(e.tier), _is_stored(e.kind)), e.block_hashes)
                      for e in batch.events]
        with self._lock:
            action = self._incarnations.batch(worker_id, batch.epoch, batch.seq, batch.lost)
            if action is not Action.IGNORE:
                if action is Action.RESET:
                    old = self._slot_of.pop(worker_id, None)
                    if old is not None:
                        self._retire_locked(old)
                self._events.apply(self._slot_locked(worker_id), ops)
            self._scrub_locked()
            return self._incarnations.in_sync(worker_id)

    # ---- queries -------------------------------------------------------------------------
    def walk(self, hashes: Sequence[BlockHash], follow: np.ndarray | None = None,
             ) -> tuple[Residency, list[str]]:
        """Every worker holding a leading run of ``hashes``, grouped by residency (only the
        workers at slots ``follow``, when given), and the worker id of each slot."""
        n = len(hashes)
        with self._lock:
            names = list(self._worker_at)
            alive = self._live
            if follow is not None:
                alive = alive & _words_of(follow, len(alive))
            if not n or not alive.any():
                return Residency(len(names)), names
            walk = ResidencyWalk(alive, self.FEW_POINTS)
            table, words = self._table, self._rows.words
            start, size = 0, self.FIRST_CHUNK
            while start < n:
                rows = table.rows(hashes[start : start + size])
                if not walk.feed(start, rows, words):
                    break
                start, size = start + size, size * 64
            return walk.finish(len(names)), names

    def residency(self, hashes: Sequence[BlockHash]) -> list[ResidencyGroup]:
        """Every worker holding a leading run of ``hashes``, grouped by identical residency
        (the best tier of each of its leading blocks); workers holding none are left out."""
        res, names = self.walk(hashes)
        out = []
        for g in range(res.num_groups):
            members = np.flatnonzero(res.group_of == g).tolist()
            out.append(ResidencyGroup(tuple(names[s] for s in members),
                                      tuple((TIERS[t], num) for t, num in res.runs(g))))
        return out

    def leading_lengths(self, hashes: Sequence[BlockHash]) -> dict[str, int]:
        """Length of the leading run of every worker holding at least the first block."""
        res, names = self.walk(hashes)
        return {names[s]: int(res.ends[s]) for s in np.flatnonzero(res.ends).tolist()}

    def leading_tiers(self, worker_id: str, hashes: Sequence[BlockHash]) -> list[str]:
        """Best tier of each block of the longest leading run ``worker_id`` holds."""
        with self._lock:
            slot = self._slot_of.get(worker_id)
            if slot is None or not hashes:
                return []
            rows = self._table.rows(hashes)
            word, bit = slot_word(slot)
            held = (self._rows.words[rows][:, :, word] & bit) != 0  # [block, tier]
        gone = np.flatnonzero(~held.any(axis=1))
        end = int(gone[0]) if len(gone) else len(held)
        return [TIERS[t] for t in held[:end].argmax(axis=1).tolist()]

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
        self._rows.ensure_slot(slot)
        if slot >= len(self._counts):
            self._counts = np.concatenate([self._counts, np.zeros_like(self._counts)])
            self._events.counts = self._counts
        self._counts[slot] = 0
        word, bit = slot_word(slot)
        if word >= len(self._live):
            self._live = np.concatenate([self._live, np.zeros(word + 1 - len(self._live),
                                                              np.uint64)])
        self._live[word] |= bit
        self.layout_version += 1
        return slot

    def _retire_locked(self, slot: int) -> int:
        """Take ``slot`` out of the live set; its bits are scrubbed later. Returns its blocks."""
        num = int(self._counts[slot, 0])
        self._counts[slot] = 0
        self._worker_at[slot] = ""
        word, bit = slot_word(slot)
        self._live[word] &= ~bit
        self.layout_version += 1
        if num:
            self._scrub.pending |= 1 << slot
            self._rows.strip[word] &= ~bit  # new rows are made without its bit
        else:
            heapq.heappush(self._free_slots, slot)
        return num

    def _free_locked(self, slots: int) -> None:
        while slots:
            low = slots & -slots
            heapq.heappush(self._free_slots, low.bit_length() - 1)
            slots ^= low

    def _scrub_locked(self) -> None:
        if self._scrub.busy:
            self._free_locked(self._scrub.step(self._rows, self._table,
                                               self.SCRUB_ROWS_PER_BATCH))

def _words_of(slots: np.ndarray, num_words: int) -> np.ndarray:
    """The bit set (uint64 words) of ``slots`` (negative ones left out)."""
    bits = np.zeros(64 * num_words, np.uint8)
    slots = slots[(slots >= 0) & (slots < len(bits))]
    bits[slots] = 1
    return np.packbits(bits, bitorder="little").view(np.uint64)


def tier_bit(tier: str) -> int:
    """``1 << position`` of ``tier`` in TIERS; ValueError naming the tiers otherwise."""
    return 1 << _tier_num(tier)


def _tier_num(tier: str) -> int:
    t = _TIER_NUM.get(tier)
    if t is None:
        raise ValueError(f"unknown tier {tier!r}: expected one of {TIERS}")
    return t


def _is_stored(kind: str) -> bool:
    if kind == EventKind.STORED:
        return True
    if kind == EventKind.REMOVED:
        return False
    raise ValueError(f"unknown event kind {kind!r}: expected one of {[str(k) for k in EventKind]}")
