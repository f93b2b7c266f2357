"""Rows of the global block index: which workers hold a block, in which tiers.

A row is one bit set (a Python int, a bit per worker slot) per tier. Rows are interned: every
block with the same holders shares one ``Row`` object, so equal rows are the same object,
compared and hashed by identity, and a block's entry costs a pointer whatever the number of
workers. ``apply_op`` is the index's hot loop: a lookup and a store per block; the new row of
each distinct old row is computed once.

A worker that leaves must not block the index while its bits are cleared from every row it is
in: its slot leaves the live set at once (placement ignores it), and ``Scrubber`` clears its
bits a bounded number of rows at a time; the slot is reused only once that is done.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

NUM_TIERS = 3
STORED, REMOVED = 1, 2  # what an operation does to a worker's bit in a tier (2 bits per tier)

Runs = dict[tuple["Row", "Row"], int]  # (old row, new row) -> how many blocks went that way


def op_code(tier_num: int, stored: bool) -> int:
    """The code of one event: ``STORED`` or ``REMOVED`` in the bits of its tier."""
    return (STORED if stored else REMOVED) << (2 * tier_num)


ANY_STORED = sum(op_code(t, True) for t in range(NUM_TIERS))  # code & this: stores somewhere


def merge_ops(batch: Sequence[tuple[int, Sequence[bytes]]]) -> list[tuple[int, Sequence[bytes]]]:
    """Consecutive events on the same hashes in different tiers as one operation (a block
    written through to host and disk: one pass over the rows instead of two)."""
    out: list[tuple[int, Sequence[bytes]]] = []
    for code, hashes in batch:
        if out:
            last_code, last_hashes = out[-1]
            free = all((last_code >> (2 * t)) & 3 == 0 for t in range(NUM_TIERS)
                       if (code >> (2 * t)) & 3)
            if free and (hashes is last_hashes or hashes == last_hashes):
                out[-1] = (last_code | code, last_hashes)
                continue
        out.append((code, hashes))
    return out


class Row:
    """The workers holding one block, a bit set per tier. Interned, never changed."""

    __slots__ = ("device", "host", "disk", "held", "__weakref__")

    def __init__(self, device: int, host: int, disk: int) -> None:
        self.device, self.host, self.disk = device, host, disk
        self.held = device | host | disk  # in any tier

    def masks(self) -> list[int]:
        return [self.device, self.host, self.disk]


EMPTY = Row(0, 0, 0)  # never stored in the index: a block nobody holds has no row


class RowTable:
    """Interns rows: one object per distinct (device, host, disk) bit sets."""

    def __init__(self) -> None:
        self._interned: weakref.WeakValueDictionary[tuple[int, ...], Row] = (
            weakref.WeakValueDictionary()
        )

    def intern(self, masks: Sequence[int]) -> Row:
        key = tuple(masks)
        if not any(key):
            return EMPTY
        row = self._interned.get(key)
        if row is None:
            row = self._interned[key] = Row(*key)
        return row

    def __len__(self) -> int:
        return len(self._interned)

    def apply(self, old: Row, code: int, bit: int) -> Row:
        """The row ``old`` becomes when operation ``code`` applies to the worker with ``bit``."""
        masks = old.masks()
        for t in range(NUM_TIERS):
            op = (code >> (2 * t)) & 3
            if op == STORED:
                masks[t] |= bit
            elif op == REMOVED:
                masks[t] &= ~bit
        return self.intern(masks)


def apply_op(rows: dict[bytes, Row], table: RowTable, code: int, bit: int,
             hashes: Sequence[bytes]) -> Runs:
    """Operation ``code`` (stored or removed, per tier) of the worker with ``bit`` on
    ``hashes``; a block nobody holds any more leaves ``rows``. Neighbouring blocks mostly share
    their row, so the last old row is checked by identity before the dict of them."""
    get = rows.get
    new_of: dict[Row, Row] = {}
    runs: Runs = {}
    run = 0
    last_old = EMPTY
    removal = not code & ANY_STORED  # only removals: a block may leave, none arrives
    last_new = EMPTY if removal else table.apply(EMPTY, code, bit)
    if removal:
        for h in hashes:
            old = get(h)
            if old is None:
                continue
            if old is not last_old:
                if run:
                    runs[(last_old, last_new)] = runs.get((last_old, last_new), 0) + run
                    run = 0
                try:
                    new = new_of[old]
                except KeyError:
                    new = new_of[old] = table.apply(old, code, bit)
                last_old, last_new = old, new
            run += 1
            if last_new is EMPTY:
                del rows[h]
            else:
                rows[h] = last_new
    else:
        for h in hashes:
            old = get(h, EMPTY)
            if old is not last_old:
                if run:
                    runs[(last_old, last_new)] = runs.get((last_old, last_new), 0) + run
                    run = 0
                try:
                    new = new_of[old]
                except KeyError:
                    new = new_of[old] = table.apply(old, code, bit)
                last_old, last_new = old, new
            run += 1
            rows[h] = last_new
    if run:
        runs[(last_old, last_new)] = runs.get((last_old, last_new), 0) + run
    return runs


def count_changes(runs: Runs, bit: int) -> list[int]:
    """How the worker's block counts (any tier, device, host, disk) change with ``runs``."""
    delta = [0] * (1 + NUM_TIERS)
    for (old, new), num in runs.items():
        if old is not new:
            for i, (a, b) in enumerate(((old.held, new.held), (old.device, new.device),
                                        (old.host, new.host), (old.disk, new.disk))):
                delta[i] += num * (bool(b & bit) - bool(a & bit))
    return delta


class Scrubber:
    """Clears the bits of retired slots from the rows, ``budget`` rows per step, over a
    snapshot of the keys taken when the round starts (rows added later never carry them)."""

    def __init__(self) -> None:
        self.pending = 0  # retired slots waiting for the next round
        self._keys: list[bytes] = []
        self._pos = 0
        self._mask = 0  # slots this round clears

    @property
    def busy(self) -> bool:
        return bool(self.pending or self._mask)

    def step(self, rows: dict[bytes, Row], table: RowTable, budget: int | None) -> int:
        """Scrub up to ``budget`` rows (all when None); returns the slots now free of bits."""
        if not self._mask:
            if not self.pending:
                return 0
            self._keys, self._pos, self._mask = list(rows), 0, self.pending
            self.pending = 0
        end = len(self._keys) if budget is None else min(len(self._keys), self._pos + budget)
        keep, mask = ~self._mask, self._mask
        new_of: dict[Row, Row] = {}
        for h in self._keys[self._pos : end]:
            row = rows.get(h)
            if row is None or not row.held & mask:
                continue
            new = new_of.get(row)
            if new is None:
                new = new_of[row] = table.intern([m & keep for m in row.masks()])
            if new is EMPTY:
                del rows[h]
            else:
                rows[h] = new
        self._pos = end
        if end < len(self._keys):
            return 0
        done, self._mask, self._keys = self._mask, 0, []
        return done
