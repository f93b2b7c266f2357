"""The router's global view of which worker holds which block, in which tiers.

Workers report their store's events (``stored`` / ``removed`` with a tier and block hashes); the
index keeps, per worker, a bit mask of tiers per block (a block can sit in HBM and on disk at
once; removing it from HBM leaves the disk copy). Thread-safe: events arrive from worker
callbacks while request threads query.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from kvstore.keys import BlockHash

# Fastest first: a block's "best" tier is the first of these it is in.
TIERS = ("device", "host", "disk")
_TIER_BIT = {tier: 1 << i for i, tier in enumerate(TIERS)}
EVENT_STORED = "stored"
EVENT_REMOVED = "removed"


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


def best_tier(mask: int) -> str:
    assert mask, "best_tier of a block held in no tier"
    return TIERS[(mask & -mask).bit_length() - 1]


class GlobalBlockIndex:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._workers: dict[str, dict[bytes, int]] = {}  # worker_id -> block_hash -> tier mask

    def add_worker(self, worker_id: str) -> None:
        with self._lock:
            self._workers.setdefault(worker_id, {})

    def remove_worker(self, worker_id: str) -> int:
        """Forget a worker (it died or left); returns how many blocks it held."""
        with self._lock:
            return len(self._workers.pop(worker_id, {}))

    def replace_worker(self, worker_id: str, blocks: dict[str, list[bytes]]) -> None:
        """Resync: ``worker_id`` now holds exactly ``blocks`` (tier -> hashes), atomically."""
        fresh: dict[bytes, int] = {}
        for tier, hashes in blocks.items():
            bit = _tier_bit(tier)
            for h in hashes:
                fresh[h] = fresh.get(h, 0) | bit
        with self._lock:
            self._workers[worker_id] = fresh

    def workers(self) -> list[str]:
        with self._lock:
            return sorted(self._workers)

    def num_blocks(self, worker_id: str, tier: str | None = None) -> int:
        with self._lock:
            blocks = self._workers.get(worker_id, {})
            if tier is None:
                return len(blocks)
            bit = _tier_bit(tier)
            return sum(1 for mask in blocks.values() if mask & bit)

    def apply(self, worker_id: str, event: StoreEventLike) -> None:
        """Apply one store event of ``worker_id`` (registering the worker if new)."""
        self.apply_many(worker_id, (event,))

    def apply_many(self, worker_id: str, events: Iterable[StoreEventLike]) -> None:
        with self._lock:
            blocks = self._workers.setdefault(worker_id, {})
            for event in events:
                bit = _tier_bit(event.tier)
                if event.kind == EVENT_STORED:
                    for h in event.block_hashes:
                        blocks[h] = blocks.get(h, 0) | bit
                elif event.kind == EVENT_REMOVED:
                    for h in event.block_hashes:
                        mask = blocks.get(h, 0) & ~bit
                        if mask:
                            blocks[h] = mask
                        else:
                            blocks.pop(h, None)
                else:
                    raise ValueError(
                        f"unknown event kind {event.kind!r}: expected "
                        f"{EVENT_STORED!r} or {EVENT_REMOVED!r}"
                    )

    def leading_tiers(self, worker_id: str, hashes: Sequence[BlockHash]) -> list[str]:
        """Best tier of each block of the longest leading run ``worker_id`` holds."""
        with self._lock:
            blocks = self._workers.get(worker_id, {})
            out: list[str] = []
            for h in hashes:
                mask = blocks.get(h, 0)
                if not mask:
                    break
                out.append(best_tier(mask))
            return out

    def prefix_hits(self, worker_id: str, hashes: Sequence[BlockHash]) -> dict[str, int]:
        """Blocks of the leading held prefix, counted by their best tier (every tier present)."""
        hits = dict.fromkeys(TIERS, 0)
        for tier in self.leading_tiers(worker_id, hashes):
            hits[tier] += 1
        return hits

    def all_prefix_hits(self, hashes: Sequence[BlockHash]) -> dict[str, dict[str, int]]:
        """``prefix_hits`` of every known worker."""
        return {w: self.prefix_hits(w, hashes) for w in self.workers()}


def _tier_bit(tier: str) -> int:
    bit = _TIER_BIT.get(tier)
    if bit is None:
        raise ValueError(f"unknown tier {tier!r}: expected one of {TIERS}")
    return bit
