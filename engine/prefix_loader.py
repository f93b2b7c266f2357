"""Loads of cached prefix blocks that run while the engine keeps serving.

Admission starts a load (``PrefixLoader.start``) and returns: the store pins the host hits and
reads the disk hits on its own threads (``TieredStore.start_load``). Between steps the engine
``poll``s: each load's newly arrived leading blocks are copied into their pool blocks on the
load lane at once (disk -> host -> device as a pipeline of chunks, the step that reads them
waits for the copy), and a load is *finished* when its head is computed and either every block
has arrived or its deadline passed: the sequence's computed tokens then jump over the blocks
that arrived, and whatever did not arrive is recomputed.

The head is the split of ``kvstore.cost``: the leading ``num_head_blocks`` blocks are computed
while the blocks after them load, so a sequence is schedulable up to ``compute_limit`` tokens
during its load (zero more without a head). Other sequences are scheduled meanwhile: a long disk
load never stops prefill and decode of everyone else. A block that fails (corrupt, evicted) ends
what is loaded: it and everything after it are recomputed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from engine.block_copier import BlockCopier
from engine.sequence import Sequence
from kvstore.cost import SpeedTracker
from kvstore.pending import PendingLease
from kvstore.store import TieredStore


@dataclass(slots=True)
class _Load:
    seq: Sequence
    pending: PendingLease
    first: int  # index (in the sequence's blocks) of the first block loaded
    deadline: float | None  # perf_counter time after which arrivals are not waited for
    issued: int = 0  # leading blocks whose copy into the pool was issued


@dataclass(frozen=True)
class LoadResult:
    num_blocks: int  # blocks loaded (from ``first``)
    tiers: tuple[str, ...]  # where each was found
    num_planned: int  # blocks the load was started for
    load_s: float = 0.0  # from the start of the load to its last arrival (or its end)


class PrefixLoader:
    def __init__(
        self, store: TieredStore, copier: BlockCopier, block_size: int, speeds: SpeedTracker
    ) -> None:
        self.store = store
        self.copier = copier
        self.block_size = block_size
        self.speeds = speeds
        self._loads: dict[str, _Load] = {}
        self._progress = threading.Event()  # set by the store's threads as blocks arrive
        self.num_cut_by_deadline = 0  # loads finished by their deadline with blocks missing
        # Deterministic mode (``KVCacheManager.set_hit_grid``): a load cut short resumes the
        # computing at the last whole chunk it reached, on the grid a cold run computes.
        self.grid_blocks = 1

    @property
    def num_loading(self) -> int:
        return len(self._loads)

    def loading(self, seq: Sequence) -> bool:
        return seq.req_id in self._loads

    def compute_limit(self, seq: Sequence) -> int:
        """Tokens of ``seq`` that may be computed now (its head while its load runs)."""
        load = self._loads.get(seq.req_id)
        return len(seq.token_ids) if load is None else load.first * self.block_size

    def start(
        self, seq: Sequence, first: int, num_blocks: int, deadline_s: float | None
    ) -> LoadResult | None:
        """Start loading ``num_blocks`` blocks of ``seq`` from its block ``first`` into its pool
        blocks; the result when it finished at once (every block a host hit, no head)."""
        hashes = seq.block_hashes[first : first + num_blocks]
        pending = self.store.start_load(hashes, on_progress=self._progress.set)
        now = time.perf_counter()
        deadline = None if deadline_s is None else now + deadline_s
        load = _Load(seq, pending, first, deadline)
        self._loads[seq.req_id] = load
        return self._advance(load, now)

    def poll(self) -> list[tuple[Sequence, LoadResult]]:
        """Copy what arrived into the pool; the loads that finished (call between steps)."""
        now = time.perf_counter()
        out = []
        for load in list(self._loads.values()):
            res = self._advance(load, now)
            if res is not None:
                out.append((load.seq, res))
        return out

    def cancel(self, seq: Sequence) -> None:
        """The sequence leaves (preempted, aborted): stop its load. Copies already issued
        complete on their own (they hold their pool blocks)."""
        load = self._loads.pop(seq.req_id, None)
        if load is not None:
            load.pending.close()

    def wait_progress(self, timeout_s: float) -> None:
        """Sleep until blocks arrive, a finished head's deadline passes, or ``timeout_s``."""
        now = time.perf_counter()
        for load in self._loads.values():
            if load.deadline is not None and self._head_done(load):
                timeout_s = min(timeout_s, max(0.0, load.deadline - now))
        self._progress.wait(timeout_s)
        self._progress.clear()

    def close(self) -> None:
        for load in list(self._loads.values()):
            self.cancel(load.seq)

    # ---- internals -----------------------------------------------------------------------
    def _head_done(self, load: _Load) -> bool:
        return load.seq.num_computed_tokens >= load.first * self.block_size

    def _advance(self, load: _Load, now: float) -> LoadResult | None:
        pending, seq = load.pending, load.seq
        ready = pending.num_ready()
        if ready > load.issued:  # the pipeline: copy each arrival into the pool right away
            lease = pending.take(ready - load.issued)
            ids = seq.block_ids[load.first + load.issued : load.first + ready]
            self.copier.load(lease, ids, lease.hashes)
            load.issued = ready
        if not self._head_done(load):
            return None
        arrived_all = ready >= pending.end()
        if not arrived_all and (load.deadline is None or now < load.deadline):
            return None
        del self._loads[seq.req_id]
        pending.close()
        if not arrived_all:
            self.num_cut_by_deadline += 1
        n = load.issued
        num_disk = pending.tiers[:n].count("disk")
        end_t = pending.settled_at if arrived_all and pending.settled_at else now
        if num_disk:
            self.speeds.observe_load(
                "disk", num_disk * self.store.block_nbytes, end_t - pending.started
            )
        end = load.first + n
        if self.grid_blocks > 1:  # recomputed in the cold run's chunks (the same bits)
            end = end // self.grid_blocks * self.grid_blocks
            n = max(0, end - load.first)
        seq.num_computed_tokens = end * self.block_size
        seq.num_registered_blocks = max(seq.num_registered_blocks, load.first + n)
        return LoadResult(n, tuple(pending.tiers[:n]), pending.num_blocks,
                          max(0.0, end_t - pending.started))
