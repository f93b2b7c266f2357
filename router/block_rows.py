"""Rows of the global block index: which workers hold a block, in which tiers.

A row is one bit set per tier (HBM, host, disk), a bit per worker slot, stored as 64-bit words:
``RowTable.words[row]`` is ``[tier, word]``. Rows are interned: blocks with the same holders
share one row id (``BlockTable.row_of``), so a block costs four bytes of row whatever the
number of workers, and the walk of a prompt looks at a row only where the row id changes.
Rows 0 (``FREE``: the row of a block-table slot never used) and 1 (``EMPTY_ROW``) hold
nobody. A row is freed when no block refers to it any more (``ref``).

An event is one operation code (``op_code``: stored or removed, per tier) of one worker on
blocks. A batch of events is folded into one code per block (``fold_codes``: per tier, the
last event wins) and applied in one pass: the new row of each distinct (old row, code) is
computed once (``transition``).

A worker that leaves must not hold the lock while its bits are cleared from every row: its slot
leaves the live set at once (queries ignore it), new rows are made without its bit
(``strip``), and ``Scrubber`` clears it from the existing rows a bounded number at a time;
rows left with no holder at all are then swept out of the block table a chunk at a time. The
slot is reused once that is done. A scrubbed row may come to equal another row: it stays a
valid row, only no longer the one new blocks are interned to.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from router.block_table import EMPTY_ROW, BlockTable

NUM_TIERS = 3
STORED, REMOVED = 1, 2  # what an operation does to a worker's bit in a tier (2 bits per tier)


def op_code(tier_num: int, stored: bool) -> int:
    """The code of one event: ``STORED`` or ``REMOVED`` in the bits of its tier."""
    return (STORED if stored else REMOVED) << (2 * tier_num)


ANY_STORED = sum(op_code(t, True) for t in range(NUM_TIERS))  # code & this: stores somewhere
_LOW_BITS = sum(1 << (2 * t) for t in range(NUM_TIERS))
# a bit per tier that an operation code touches, by code
_TIERS_OF = [sum(1 << t for t in range(NUM_TIERS) if (code >> (2 * t)) & 3)
             for code in range(1 << (2 * NUM_TIERS))]
MERGE_WINDOW = 16  # earlier events an event may join (bounds a batch's merging to O(events))


def merge_ops(batch: Sequence[tuple[int, Sequence[bytes]]]) -> list[tuple[int, Sequence[bytes]]]:
    """Events on the same hashes in different tiers as one operation (a block written through
    to host and disk: one pass over the rows instead of two, and no block twice in the batch,
    which would need ``fold_codes``). An event joins an earlier one on the same hashes when
    one of the two commutes with every event between them: those touch none of its tiers.
    Only the last ``MERGE_WINDOW`` operations are looked at."""
    out: list[tuple[int, Sequence[bytes]]] = []
    for code, hashes in batch:
        tiers = _TIERS_OF[code]
        between = 0  # tiers the events after out[j] touch
        for j in range(len(out) - 1, max(-1, len(out) - 1 - MERGE_WINDOW), -1):
            last_code, last_hashes = out[j]
            last_tiers = _TIERS_OF[last_code]
            if (not tiers & last_tiers and (hashes is last_hashes or hashes == last_hashes)
                    and not (between & tiers and between & last_tiers)):
                merged = (last_code | code, last_hashes)
                if between & tiers:  # the earlier event moves after the ones between
                    del out[j]
                    out.append(merged)
                else:  # this one moves back to the earlier one
                    out[j] = merged
                break
            between |= last_tiers
        else:
            out.append((code, hashes))
    return out


def fold_codes(codes: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """One code per block of a batch of events: ``codes`` has the code of each event of each
    block, blocks one after the other (each starting at ``starts``), events in order. Per
    tier, the last event touching the tier says what happened to the block there."""
    touched = (codes | (codes >> 1)) & _LOW_BITS  # a bit per tier an event touches
    if (np.add.reduceat(touched, starts) == np.bitwise_or.reduceat(touched, starts)).all():
        return np.bitwise_or.reduceat(codes, starts)  # a block's events touch distinct tiers
    entry = np.arange(len(codes))
    folded = np.zeros(len(starts), np.int64)
    for t in range(NUM_TIERS):
        op = (codes >> (2 * t)) & 3
        last = np.maximum.reduceat(np.where(op != 0, entry, -1), starts)
        folded |= np.where(last >= 0, op[last], 0) << (2 * t)
    return folded


def slot_word(slot: int) -> tuple[int, np.uint64]:
    """The word of ``slot``'s bit and the bit within it."""
    return slot >> 6, np.uint64(1 << (slot & 63))


class RowTable:
    """Interned rows: one id per distinct (device, host, disk) bit sets. Not thread-safe."""

    def __init__(self) -> None:
        self.num_words = 1
        self.words = np.zeros((64, NUM_TIERS, 1), np.uint64)
        self.ref = np.zeros(64, np.int64)  # blocks referring to each row (empty rows: not counted)
        self.num_rows = EMPTY_ROW + 1  # ids in use or freed are below this
        self._free: list[int] = []
        self.is_free = [False] * 64
        self._ids: dict[bytes, int] = {self.words[EMPTY_ROW].tobytes(): EMPTY_ROW}
        self.strip = np.full(1, ~np.uint64(0))  # bits new rows may have (retired slots: 0)

    def __len__(self) -> int:
        """Rows in use, the empty ones left out."""
        return self.num_rows - 1 - EMPTY_ROW - len(self._free)

    @property
    def nbytes(self) -> int:
        return self.words.nbytes + self.ref.nbytes + 100 * len(self._ids)

    def ensure_slot(self, slot: int) -> None:
        """Make room for worker ``slot``'s bit in every row."""
        need = (slot >> 6) + 1
        if need <= self.num_words:
            return
        grown = np.zeros((len(self.words), NUM_TIERS, need), np.uint64)
        grown[:, :, : self.num_words] = self.words
        self.words = grown
        self.strip = np.concatenate([self.strip, np.full(need - self.num_words, ~np.uint64(0))])
        self.num_words = need
        self._ids = {grown[r].tobytes(): r for r in self._ids.values()}

    def intern(self, masks: np.ndarray) -> int:
        """The id of the row with these ``[tier, word]`` bits (made if new)."""
        key = masks.tobytes()
        row = self._ids.get(key)
        if row is not None:
            return row
        if self._free:
            row = self._free.pop()
            self.is_free[row] = False
        else:
            row = self.num_rows
            if row == len(self.words):
                self.words = np.concatenate([self.words, np.zeros_like(self.words)])
                self.ref = np.concatenate([self.ref, np.zeros_like(self.ref)])
                self.is_free.extend([False] * row)
            self.num_rows += 1
        self.words[row] = masks
        self._ids[key] = row
        return row

    def transition(self, row: int, code: int, word: int, bit: np.uint64) -> int:
        """The row ``row`` becomes when operation ``code`` applies to the worker with ``bit`` in
        ``word`` (bits of retired slots dropped)."""
        masks = self.words[row] & self.strip  # [tier, word]
        for t in range(NUM_TIERS):
            op = (code >> (2 * t)) & 3
            if op == STORED:
                masks[t, word] |= bit
            elif op == REMOVED:
                masks[t, word] &= ~bit
        return self.intern(masks)

    def bits(self, row: int, word: int, bit: np.uint64) -> tuple[int, int, int, int]:
        """Whether (1 or 0) the worker is in ``row``: in any tier, in HBM, host, disk."""
        b = int(bit)
        d, h, s = (int(x & b != 0) for x in self.words[row, :, word].tolist())
        return d | h | s, d, h, s

    def transitions(self, rows: np.ndarray, codes: np.ndarray, word: int, bit: np.uint64,
                    ) -> np.ndarray:
        """``transition`` of each (row, code) pair."""
        masks = self.words[rows] & self.strip  # [pair, tier, word]
        for t in range(NUM_TIERS):
            op = (codes >> (2 * t)) & 3
            col = masks[:, t, word]
            masks[:, t, word] = np.where(op == STORED, col | bit,
                                         np.where(op == REMOVED, col & ~bit, col))
        keys = masks.reshape(len(rows), -1).view(np.dtype((np.void, masks[0].nbytes)))
        get = self._ids.get
        out = [get(k) for k in keys.ravel().tolist()]
        for i, row in enumerate(out):
            if row is None:
                out[i] = self.intern(masks[i])
        return np.array(out, np.int64)

    def counts(self, rows: np.ndarray, num: np.ndarray, word: int, bit: np.uint64) -> np.ndarray:
        """Blocks the worker holds in [any tier, HBM, host, disk] among ``num[i]`` blocks in
        row ``rows[i]``."""
        tiers = (self.words[rows, :, word] & bit) != 0  # [row, tier]
        held = np.concatenate([tiers.any(axis=1)[:, None], tiers], axis=1)
        return num @ held

    def release(self, row: int) -> None:
        """``row`` has no block left: free its id."""
        if self.is_free[row]:
            return
        key = self.words[row].tobytes()
        if self._ids.get(key) == row:
            del self._ids[key]
        self.words[row] = 0
        self.ref[row] = 0
        self.is_free[row] = True
        self._free.append(row)

    def clear_bits(self, row: int, keep: np.ndarray) -> bool:
        """Keep only the ``keep`` bits of ``row`` (in place); True when none is left."""
        key = self.words[row].tobytes()
        if self._ids.get(key) == row:
            del self._ids[key]
        self.words[row] &= keep
        if not self.words[row].any():
            return True
        self._ids.setdefault(self.words[row].tobytes(), row)
        return False


class Scrubber:
    """Clears the bits of retired slots from the rows, ``budget`` rows per step; rows left with
    no holder are swept out of the block table, ``64 * budget`` slots per step."""

    def __init__(self) -> None:
        self.pending = 0  # retired slots (a bit each) waiting for the next round
        self._mask = 0  # slots this round clears
        self._todo: list[int] = []  # rows still to clear
        self._zero: list[int] = []  # rows left with no holder
        self._sweep = -1  # next block slot to sweep (-1: not sweeping)
        self._generation = -1  # of the block table the sweep runs over

    @property
    def busy(self) -> bool:
        return bool(self.pending or self._mask)

    def step(self, rows: RowTable, table: BlockTable, budget: int | None) -> int:
        """Up to ``budget`` rows (all when None); returns the slots now free of bits."""
        if not self._mask:
            if not self.pending:
                return 0
            self._mask, self.pending = self.pending, 0
            keep = ~_words(self._mask, rows.num_words)
            hit = (rows.words[: rows.num_rows] & ~keep).any(axis=(1, 2))
            self._todo = np.flatnonzero(hit).tolist()
        keep = ~_words(self._mask, rows.num_words)
        n = len(self._todo) if budget is None else min(budget, len(self._todo))
        for row in self._todo[:n]:
            if not rows.is_free[row] and rows.clear_bits(row, keep):
                self._zero.append(row)
        del self._todo[:n]
        if self._todo:
            return 0
        if self._zero and not self._sweep_step(rows, table, budget):
            return 0
        done, self._mask = self._mask, 0
        rows.strip |= ~keep  # the bits are gone: new rows may carry them again
        return done

    def _sweep_step(self, rows: RowTable, table: BlockTable, budget: int | None) -> bool:
        """Blocks of rows with no holder become tombstones; True once the table is swept."""
        # a row freed (and maybe reused) meanwhile is no longer one to sweep
        self._zero = [r for r in self._zero if not rows.is_free[r] and not rows.words[r].any()]
        start = max(self._sweep, 0) if self._generation == table.generation else 0
        self._generation = table.generation  # a rebuilt table has new ids: start again
        end = table.capacity if budget is None else min(table.capacity, start + 64 * budget)
        is_zero = np.zeros(rows.num_rows, bool)
        is_zero[self._zero] = True
        seg = table.row_of[start:end]
        gone = np.flatnonzero(is_zero[seg] & (seg > EMPTY_ROW))
        seg[gone] = EMPTY_ROW
        table.num_held -= len(gone)
        if end < table.capacity:
            self._sweep = end
            return False
        for row in self._zero:
            rows.release(row)
        self._zero, self._sweep = [], -1
        return True


def _words(mask: int, num_words: int) -> np.ndarray:
    """A Python int bit set as ``num_words`` little-endian uint64 words."""
    return np.frombuffer(mask.to_bytes(8 * num_words, "little"), np.uint64).copy()
