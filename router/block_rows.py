"""Rows of the global block index: which workers hold a block, in which tiers.

A row is one bit set (a Python int, a bit per worker slot) per tier. Rows are interned: every
block with the same holders shares one ``Row`` object, so equal rows are the same object,
compared and hashed by identity, and a block's entry costs a pointer whatever the number of
workers. An event computes the new row of each distinct old row once (the caller remembers
old -> new for the event), so the per-block work is two dictionary lookups and a store.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

NUM_TIERS = 3
STORED, REMOVED = 1, 2  # what an operation does to a worker's bit in a tier (2 bits per tier)


def op_code(tier_num: int, stored: bool) -> int:
    """The code of one event: ``STORED`` or ``REMOVED`` in the bits of its tier."""
    return (STORED if stored else REMOVED) << (2 * tier_num)


DROP_ALL = sum(op_code(t, False) for t in range(NUM_TIERS))  # removed from every tier


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

    def rows(self) -> list[Row]:
        """Every row alive (held by some block or caller)."""
        return list(self._interned.values())

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
