"""Who holds a prompt's leading blocks, in which tiers: one walk over the blocks for all workers.

``ResidencyWalk`` is fed the row ids of the prompt's blocks, a chunk at a time
(``GlobalBlockIndex.walk``); it looks at a row only where the row id changes (neighbouring
blocks mostly share their row), and keeps, at each such change point, the rows' bit sets: HBM,
host, disk. The set of workers still holding the whole prefix is their AND, accumulated along
the change points, so the work per change point is a few word operations whatever the number
of workers, and the walk stops as soon as nobody (of the workers it follows) holds the prefix.

``finish`` looks only at what changes: a worker's state (0: it no longer holds the prefix; 1,
2, 3: the block's best tier is HBM, host, disk) changes at a few change points, and those
(change point, worker) pairs are read out of the bit sets' XOR with the previous change point,
so the work is proportional to the changes, not to change points x workers. Workers whose
changes are equal all along (same points, same states) hold the same best tier block for block
up to the same end: the same residency. They form one group (found by a hash of their changes,
then checked pair by pair), and the cost model evaluates a load plan once per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from router.block_table import EMPTY_ROW

# (tier number, number of blocks) of each run of equal best tiers, in prompt order
Runs = tuple[tuple[int, int], ...]

_FEW_GROUPS = 16  # groups up to which ``finish`` splits groups of bit sets
_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


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


@dataclass
class _Changes:
    """Every (worker, change point) where a holder's state changes, sorted by worker."""

    slot: np.ndarray  # the worker
    state: np.ndarray  # its state from there on (0: gone)
    start: np.ndarray  # first block the state applies to
    span: np.ndarray  # blocks it applies to (up to the next change, or the walk's end)
    first: np.ndarray  # holder -> index of its first change


class Residency:
    """The walk's answer, per worker slot of the index (arrays of ``num_slots``)."""

    def __init__(self, num_slots: int, changes: _Changes | None = None,
                 group_of_holder: np.ndarray | None = None, reps: np.ndarray | None = None,
                 end: int = 0) -> None:
        self.ends = np.zeros(num_slots, np.int64)  # leading blocks a slot holds (0: none)
        self.group_of = np.full(num_slots, -1, np.int64)  # its group, -1: it holds none
        self.tier_blocks = np.zeros((num_slots, 3), np.int64)  # of those, best in each tier
        self._changes = changes
        self._reps = reps if reps is not None else np.zeros(0, np.int64)  # group -> holder
        self._runs: dict[int, Runs] = {}
        self.longest = 0
        if changes is None or group_of_holder is None:
            return
        c = changes
        holders = c.slot[c.first]
        held = c.state != 0
        self.ends[holders] = end
        gone = ~held
        self.ends[c.slot[gone]] = c.start[gone]
        self.group_of[holders] = group_of_holder
        np.add.at(self.tier_blocks, (c.slot[held], c.state[held] - 1), c.span[held])
        self.longest = int(self.ends.max())

    @classmethod
    def of_groups(cls, num_slots: int, groups: list[tuple[int, Runs, int]]) -> Residency:
        """From (workers bit set, runs, end) of each group."""
        res = cls(num_slots)
        if not groups:
            return res
        nbytes = 8 * ((num_slots + 63) // 64)
        masks = np.frombuffer(b"".join(m.to_bytes(nbytes, "little") for m, _, _ in groups),
                              np.uint8).reshape(len(groups), nbytes)
        member = np.unpackbits(masks, axis=1, bitorder="little")[:, :num_slots]  # [group, slot]
        holds = member.any(axis=0)
        group_of = member.argmax(axis=0)
        res.group_of = np.where(holds, group_of, -1)
        per_group = np.array([[end, *_tier_counts(runs)] for _, runs, end in groups], np.int64)
        res.ends = np.where(holds, per_group[group_of, 0], 0)
        res.tier_blocks = np.where(holds[:, None], per_group[group_of, 1:], 0)
        res._runs = {g: runs for g, (_, runs, _) in enumerate(groups)}
        res._reps = np.arange(len(groups))
        res.longest = int(per_group[:, 0].max())
        return res

    @property
    def num_groups(self) -> int:
        return len(self._reps)

    def runs(self, group: int) -> Runs:
        """(tier number, number of blocks) of the group's leading run."""
        runs = self._runs.get(group)
        if runs is None:
            c = self._changes
            assert c is not None
            holder = int(self._reps[group])
            lo = int(c.first[holder])
            hi = int(c.first[holder + 1]) if holder + 1 < len(c.first) else len(c.slot)
            runs = tuple((s - 1, n) for s, n in zip(c.state[lo:hi].tolist(),
                                                    c.span[lo:hi].tolist()) if s)
            self._runs[group] = runs
        return runs


class ResidencyWalk:
    def __init__(self, alive: np.ndarray, few_points: int = 16) -> None:
        """``alive``: the bit set (uint64 words) of the workers to follow; up to ``few_points``
        change points, ``finish`` splits groups of bit sets instead of reading changes."""
        self._alive = alive.copy()
        self._few_points = few_points
        self._last_row = -1
        self._pos: list[np.ndarray] = []
        self._tiers: list[np.ndarray] = []  # [change point, HBM | host, word] per chunk
        self._held: list[np.ndarray] = []  # [change point, word]: holders of the prefix
        self.end = 0  # blocks walked

    def feed(self, start: int, rows: np.ndarray, words: np.ndarray) -> bool:
        """Row ids of blocks ``start ..``; ``words``: the row table's ``[row, tier, word]``
        bits. False once nobody followed holds the prefix (feed no more)."""
        stop = False
        empty = np.flatnonzero(rows <= EMPTY_ROW)
        if len(empty):
            rows = rows[: empty[0]]
            stop = True
        self.end = start + len(rows)
        if len(rows):
            change = np.flatnonzero(rows[1:] != rows[:-1]) + 1
            if rows[0] != self._last_row:
                change = np.concatenate([[0], change])
            self._last_row = int(rows[-1])
            if len(change):
                bits = words[rows[change]]  # [change point, tier, word]
                held = bits[:, 0] | bits[:, 1] | bits[:, 2]
                held[0] &= self._alive
                held = np.bitwise_and.accumulate(held, axis=0)
                gone = np.flatnonzero(~held.any(axis=1))
                if len(gone):
                    cut = gone[0] + 1
                    change, bits, held = change[:cut], bits[:cut], held[:cut]
                    self.end = start + int(change[-1])
                    stop = True
                self._pos.append(change + start)
                self._tiers.append(bits[:, :2])
                self._held.append(held)
                self._alive = held[-1]
        return not stop

    def _refine(self, pos: np.ndarray, held: np.ndarray, device: np.ndarray, host: np.ndarray,
                ) -> list[tuple[int, Runs, int]] | None:
        """Few change points: split the holders, change point by change point, by the best
        tier of the block there (bit sets as Python integers); None past ``_FEW_GROUPS``."""
        def ints(words: np.ndarray) -> list[int]:
            return [int.from_bytes(row.tobytes(), "little") for row in words]

        starts = pos.tolist()
        held_at, device_at, host_at = ints(held), ints(device), ints(host)
        groups: list[tuple[int, list[tuple[int, int]]]] = [(held_at[0], [])]
        done: list[tuple[int, list[tuple[int, int]], int]] = []
        for c, start in enumerate(starts):
            split = []
            for mask, runs in groups:
                gone = mask & ~held_at[c]
                if gone:
                    done.append((gone, runs, start))
                d = mask & device_at[c]
                h = mask & host_at[c]
                for t, part in ((0, d), (1, h), (2, mask & held_at[c] & ~d & ~h)):
                    if part:
                        split.append((part, runs if runs and runs[-1][0] == t
                                      else [*runs, (t, start)]))
            groups = split
            if len(groups) + len(done) > _FEW_GROUPS:
                return None
        done += [(mask, runs, self.end) for mask, runs in groups]
        out = []
        for mask, runs, end in done:
            bounds = [start for _, start in runs] + [end]
            out.append((mask, tuple((t, bounds[j + 1] - bounds[j]) for j, (t, _) in
                                    enumerate(runs)), end))
        return [g for g in out if g[1]]

    def finish(self, num_slots: int) -> Residency:
        """The holders of the walked prefix, grouped by residency."""
        if not self._pos:
            return Residency(num_slots)
        pos = np.concatenate(self._pos)
        held = np.concatenate(self._held)  # [change point, word]
        tiers = np.concatenate(self._tiers)
        device = tiers[:, 0] & held
        host = tiers[:, 1] & held & ~device
        if len(pos) <= self._few_points:
            groups = self._refine(pos, held, device, host)
            if groups is not None:
                return Residency.of_groups(num_slots, groups)
        changed = np.zeros_like(held)
        changed[0] = held[0]  # at the first change point, every holder starts
        for now in (held, device, host):
            changed[1:] |= now[1:] ^ now[:-1]
        point, word = np.nonzero(changed)  # the words with a change
        octets = changed[point, word].view(np.uint8).reshape(-1, 8)
        which, octet = np.nonzero(octets)  # their bytes with a change (a change: a few bits)
        bits = np.unpackbits(octets[which, octet][:, None], axis=1, bitorder="little")
        at, low = np.nonzero(bits)
        if not len(at):
            return Residency(num_slots)
        which, bit = which[at], octet[at] * 8 + low
        point, word = point[which], word[which]
        shift = bit.astype(np.uint64)
        state = ((held[point, word] >> shift) & 1).astype(np.int64)
        state *= 3 - 2 * ((device[point, word] >> shift) & 1).astype(np.int64) - (
            (host[point, word] >> shift) & 1).astype(np.int64)
        slot = word * 64 + bit
        order = np.argsort(slot, kind="stable")  # by worker, its changes in prompt order
        slot, state, start = slot[order], state[order], pos[point[order]]
        new = np.concatenate([[True], slot[1:] != slot[:-1]])
        first = np.flatnonzero(new)
        span = np.append(start[1:], self.end) - start
        last = np.append(first[1:], len(slot)) - 1
        span[last] = self.end - start[last]  # (a worker's last state: held up to the end)
        changes = _Changes(slot, state, start, span, first)
        group, reps = _group(changes)
        return Residency(num_slots, changes, group, reps, self.end)


def _tier_counts(runs: Runs) -> list[int]:
    counts = [0, 0, 0]
    for t, num in runs:
        counts[t] += num
    return counts


def _group(c: _Changes) -> tuple[np.ndarray, np.ndarray]:
    """Holders with equal changes: (group of each holder, a holder of each group)."""
    count = np.diff(np.append(c.first, len(c.slot)))
    offset = np.arange(len(c.slot)) - np.repeat(c.first, count)  # index among its changes
    x = (offset.astype(np.uint64) << np.uint64(32)) ^ c.start.astype(np.uint64)
    x = (x * _MIX[0]) ^ (c.state.astype(np.uint64) * _MIX[1])
    x = (x ^ (x >> np.uint64(31))) * _MIX[2]
    sig = np.add.reduceat(x, c.first) ^ (count.astype(np.uint64) * _MIX[0])
    _, reps, group = np.unique(sig, return_index=True, return_inverse=True)
    group = group.reshape(-1)
    rep_first = np.repeat(c.first[reps[group]], count) + offset  # the same change of its rep
    if len(rep_first) and (rep_first.max() >= len(c.slot)
                           or (c.start[rep_first] != c.start).any()
                           or (c.state[rep_first] != c.state).any()
                           or (count != count[reps[group]]).any()):
        return _group_exactly(c, count)  # two residencies with one hash: compare them all
    return group, reps


def _group_exactly(c: _Changes, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keys: dict[tuple[int, ...], int] = {}
    group, reps = [], []
    for h, (lo, n) in enumerate(zip(c.first.tolist(), count.tolist())):
        key = tuple(c.start[lo : lo + n].tolist() + c.state[lo : lo + n].tolist())
        g = keys.setdefault(key, len(keys))
        if g == len(reps):
            reps.append(h)
        group.append(g)
    return np.array(group, np.int64), np.array(reps, np.int64)
