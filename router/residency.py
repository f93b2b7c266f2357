"""Who holds a prompt's leading blocks, in which tiers: one walk over the blocks for all workers.

``ResidencyWalk`` is fed, block by block, the bit sets of the workers holding the block in HBM,
host and disk (``GlobalBlockIndex.residency`` feeds it only the blocks where those sets change).
It keeps the workers still holding the whole prefix so far, split into groups whose blocks sat
in the same best tiers: while the groups are few it refines them as bit sets (a few integer
operations per block, whatever the number of workers); past ``max_groups`` distinct residencies
it follows each worker whose tier changed (work proportional to the changes, never to
groups x blocks). Either way the answer is the partition of the holders by residency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# (tier number, first block) of each run of equal best tiers, oldest first
Runs = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ResidencyGroup:
    """Workers whose leading blocks sit in the same tiers, block for block."""

    worker_ids: tuple[str, ...]  # in the order of their slots in the index
    runs: tuple[tuple[str, int], ...]  # (best tier, number of blocks) of the leading run, in order

    @property
    def num_blocks(self) -> int:
        return sum(num for _, num in self.runs)

    def tiers(self) -> list[str]:
        """The best tier of every leading block."""
        return [tier for tier, num in self.runs for _ in range(num)]


class ResidencyWalk:
    def __init__(self, alive: int, max_groups: int = 32) -> None:
        if max_groups < 1:
            raise ValueError(f"max_groups must be >= 1, got {max_groups}")
        self.max_groups = max_groups
        self._alive = alive  # workers holding every block so far
        self._device = 0  # of those, the ones whose last block is in HBM
        self._host = 0  # ... in host memory and not in HBM
        self._groups: list[tuple[int, Runs]] | None = [(alive, ())]  # None: per-worker mode
        self._runs_of: dict[int, Runs] = {}  # per-worker mode: slot -> runs
        self._done: list[tuple[int, Runs, int]] = []  # (workers, runs, end) of finished runs

    def step(self, i: int, device: int, host: int, disk: int) -> bool:
        """Block ``i`` (blocks in between hold the same sets as the last one fed); False once
        no worker holds the prefix any more."""
        alive = self._alive
        a = (device | host | disk) & alive
        d = device & a
        h = host & a & ~d
        changed = (alive ^ a) | (d ^ self._device) | (h ^ self._host)
        if changed or i == 0:
            if self._groups is not None:
                self._refine(i, a, d, h, changed if i else alive)
            else:
                self._follow(i, a, d, h, changed)
        self._alive, self._device, self._host = a, d, h
        return bool(a)

    def finish(self, n: int) -> list[tuple[int, tuple[tuple[int, int], ...]]]:
        """(workers bit set, ((tier number, num blocks), ...)) per distinct residency, for a
        prompt of ``n`` blocks."""
        ends = list(self._done)
        if self._groups is not None:
            ends += [(m, runs, n) for m, runs in self._groups]
        else:
            ends += [(1 << s, runs, n) for s, runs in self._runs_of.items()]
        merged: dict[tuple[Runs, int], int] = {}
        for mask, runs, end in ends:
            if runs:
                merged[(runs, end)] = merged.get((runs, end), 0) | mask
        return [(mask, _counts(runs, end)) for (runs, end), mask in merged.items()]

    def _refine(self, i: int, a: int, d: int, h: int, changed: int) -> None:
        assert self._groups is not None
        parts = ((0, d), (1, h), (2, a & ~d & ~h))
        groups: list[tuple[int, Runs]] = []
        for m, runs in self._groups:
            if not m & changed:
                groups.append((m, runs))
                continue
            gone = m & ~a
            if gone and runs:
                self._done.append((gone, runs, i))
            rest = m & a
            for t, tier_mask in parts:
                part = rest & tier_mask
                if part:
                    groups.append((part, runs if runs and runs[-1][0] == t else runs + ((t, i),)))
        if len(groups) <= self.max_groups:
            self._groups = groups
            return
        self._groups = None  # too many residencies: follow each worker from here on
        for m, runs in groups:
            for s in slots_of(m):
                self._runs_of[s] = runs

    def _follow(self, i: int, a: int, d: int, h: int, changed: int) -> None:
        for s in slots_of(changed):
            bit = 1 << s
            runs = self._runs_of[s]
            if not a & bit:
                self._done.append((bit, runs, i))
                del self._runs_of[s]
                continue
            t = 0 if d & bit else 1 if h & bit else 2
            if runs[-1][0] != t:
                self._runs_of[s] = runs + ((t, i),)


def _counts(runs: Runs, end: int) -> tuple[tuple[int, int], ...]:
    starts = [start for _, start in runs] + [end]
    return tuple((t, starts[j + 1] - start) for j, (t, start) in enumerate(runs))


def slots_of(mask: int) -> list[int]:
    """Positions of the set bits of ``mask`` (>= 0), ascending."""
    if mask.bit_count() <= 16:
        out: list[int] = []
        while mask:
            low = mask & -mask
            out.append(low.bit_length() - 1)
            mask ^= low
        return out
    raw = np.frombuffer(mask.to_bytes((mask.bit_length() + 7) // 8, "little"), dtype=np.uint8)
    return np.flatnonzero(np.unpackbits(raw, bitorder="little")).tolist()
