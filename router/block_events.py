"""Applying a worker's batch of block events to the block table and the rows.

A batch (``(op code, block hashes)`` per event, in order) becomes one pass: events on the same
hashes in different tiers merge into one (``block_rows.merge_ops``), every hash is looked up at
once (equal hashes get equal block ids), and only when a block is in several events are the
ids sorted and the events folded per block (``block_rows.fold_codes``: per tier, the last
event wins); each block then moves to its new row: the new row of each distinct (old row,
code) pair is computed once, the worker's block counts and the rows' reference counts change
by pair, not by block.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvstore.keys import HASH_NBYTES
from router.block_rows import ANY_STORED, NUM_TIERS, RowTable, fold_codes, merge_ops, slot_word
from router.block_table import EMPTY_ROW, BlockTable, split_raw

Batch = list[tuple[int, Sequence[bytes]]]  # (op code, block hashes) per event, in order


class EventApplier:
    """Applies batches to ``table`` and ``rows`` and keeps ``counts`` ([slot, any | HBM | host
    | disk] blocks held); the caller holds the index's lock."""

    def __init__(self, table: BlockTable, rows: RowTable, counts: np.ndarray) -> None:
        self.table, self.rows, self.counts = table, rows, counts

    def apply(self, slot: int, batch: Batch) -> None:
        """The events of ``batch`` (in order) of the worker at ``slot``: every hash looked up
        once, the events folded per block when a block is in more than one of them, one pass
        over the rows."""
        batch = merge_ops([(code, hashes) for code, hashes in batch if len(hashes)])
        if not batch:
            return
        k0, k1 = _keys([hashes for _, hashes in batch])
        codes = np.repeat(np.array([code for code, _ in batch], np.int64),
                          [len(hashes) for _, hashes in batch])
        stores = any(code & ANY_STORED for code, _ in batch)
        ids = self.table.find_keys(k0, k1, insert=stores)  # equal hashes: equal ids
        if not stores:
            known = ids >= 0
            ids, codes = ids[known], codes[known]
        old = self._rows_if_distinct(ids)
        if old is None:  # a block in several events: fold them, in order, per block
            order = np.argsort(ids, kind="stable")
            ids, codes = ids[order], codes[order]
            starts = np.flatnonzero(np.concatenate([[True], ids[1:] != ids[:-1]]))
            codes = fold_codes(codes, starts)
            ids = ids[starts]
            old = self.table.row_of[ids]
        self._apply_distinct(slot, ids, old, codes)

    def _rows_if_distinct(self, ids: np.ndarray) -> np.ndarray | None:
        """The row of each block of ``ids``, or None when an id repeats. Found without a sort:
        each position is written into its block's row id and read back (a repeated id keeps
        the last position written), then the row ids are put back; the lock is held."""
        row_of = self.table.row_of
        old = row_of[ids]
        each = np.arange(len(ids), dtype=row_of.dtype)
        row_of[ids] = each
        repeats = bool((row_of[ids] != each).any())
        row_of[ids] = old
        return None if repeats else old

    def _apply_distinct(self, slot: int, ids: np.ndarray, old: np.ndarray, codes: np.ndarray,
                        ) -> None:
        """Operation ``codes[i]`` of the worker at ``slot`` on block ``ids[i]`` (distinct), in
        row ``old[i]``: the new row of each distinct (old row, code) computed once."""
        if not len(ids):
            return
        table, rows = self.table, self.rows
        word, bit = slot_word(slot)
        key = (old.astype(np.int64) << 6) | codes  # codes fit in 6 bits
        pairs, inv, num = _distinct(key, rows.num_rows << 6)
        before = pairs >> 6
        if len(pairs) <= 4:  # the usual case: a few pairs, plain integers
            self._apply_pairs(slot, before.tolist(), (pairs & 63).tolist(),
                                     num.tolist(), ids, inv)
            return
        after = rows.transitions(before, pairs & 63, word, bit)
        changed = after != before
        if not changed.any():
            return
        table.row_of[ids] = after[inv]
        before, after, num = before[changed], after[changed], num[changed]
        self.counts[slot] += (rows.counts(after, num, word, bit)
                               - rows.counts(before, num, word, bit))
        table.num_held += int(num[before == EMPTY_ROW].sum() - num[after == EMPTY_ROW].sum())
        kept = after != EMPTY_ROW
        np.add.at(rows.ref, after[kept], num[kept])
        left = before != EMPTY_ROW
        np.subtract.at(rows.ref, before[left], num[left])
        for row in np.unique(before[left]).tolist():
            if not rows.ref[row]:
                rows.release(row)

    def _apply_pairs(self, slot: int, before: list[int], codes: list[int],
                            num: list[int], ids: np.ndarray, inv: np.ndarray | None) -> None:
        """``_apply_distinct`` for a few (old row, code) pairs, one at a time."""
        table, rows = self.table, self.rows
        word, bit = slot_word(slot)
        after = [rows.transition(o, c, word, bit) for o, c in zip(before, codes)]
        if after == before:
            return
        table.row_of[ids] = after[0] if inv is None else np.array(after, np.int32)[inv]
        delta = [0] * (1 + NUM_TIERS)
        released = []
        for o, n, k in zip(before, after, num):
            if o == n:
                continue
            for i, (a, b) in enumerate(zip(rows.bits(o, word, bit), rows.bits(n, word, bit))):
                delta[i] += k * (b - a)
            if n != EMPTY_ROW:
                rows.ref[n] += k
            else:
                table.num_held -= k
            if o != EMPTY_ROW:
                released.append((o, k))
            else:
                table.num_held += k
        for o, k in released:
            rows.ref[o] -= k
            if not rows.ref[o]:
                rows.release(o)
        self.counts[slot] += delta



def _distinct(key: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``np.unique(key, return_inverse=True, return_counts=True)`` (inverse None when all are
    equal) of keys in ``[0, bound)``; counted, not sorted, when ``bound`` is small."""
    if (key == key[0]).all():
        return key[:1], None, np.array([len(key)])
    if bound > max(1 << 16, 4 * len(key)):
        return np.unique(key, return_inverse=True, return_counts=True)
    counts = np.bincount(key, minlength=bound)
    values = np.flatnonzero(counts)
    at = np.empty(bound, np.intp)
    at[values] = np.arange(len(values))
    return values, at[key], counts[values]


def _keys(parts: list[Sequence[bytes]]) -> tuple[np.ndarray, np.ndarray]:
    """``split_hashes`` of several lists of hashes, one after the other."""
    raw = b"".join(parts[0]) if len(parts) == 1 else b"".join([b"".join(p) for p in parts])
    if len(raw) != HASH_NBYTES * sum(map(len, parts)):
        raise ValueError(f"block hashes must be {HASH_NBYTES} bytes each")
    return split_raw(raw)


