"""Worker incarnations: which event batches and snapshots of a worker the index may apply.

Every start of a worker process gets a new epoch (``worker.base``). Each drain of its
events and each snapshot of its blocks is numbered within the epoch (``seq`` 1, 2, ...), in
the order the worker made them (both run on its engine loop). The index keeps, per worker, the
epoch it follows, the last number it applied and whether its entries are complete (``synced``:
a snapshot and every batch after it). The rules (``Incarnations``):

- a batch or snapshot of an epoch left behind is stale: ignored (a restarted worker numbers
  its events from 1 again; its old incarnation's blocks are gone);
- a batch numbered at or below the last one applied is already in the entries: ignored;
- a batch of a new epoch: the worker restarted unnoticed; its entries go at once (its memory
  tiers are gone, its disk may be), the batch applies, and the worker waits for a snapshot;
- a batch that skips a number (a drain whose reply was lost) or says the worker dropped
  events: the entries can no longer be trusted; they go, the batch applies, a snapshot is due;
- a snapshot applies only when numbered above every batch applied (else it would undo a
  newer batch: the caller takes another one); it makes the worker synced again;
- once the index drops a worker (it died), its epoch's batches are ignored; a later epoch's
  batches too, until a snapshot of it brings the worker back.

Batches without an epoch (``epoch=None``: simulations, tests of the index alone) skip all this.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

MAX_PAST_EPOCHS = 8  # epochs remembered per worker to recognise stale ones


class Action(enum.Enum):
    IGNORE = "ignore"  # stale or already applied
    APPLY = "apply"  # the next batch: apply it
    RESET = "reset"  # drop the worker's entries, then apply it (a snapshot is due)


@dataclass(slots=True)
class Incarnation:
    epoch: int  # the incarnation the index follows
    seq: int = 0  # the last batch or snapshot applied
    synced: bool = False  # entries = a snapshot + every batch after it
    dropped: bool = False  # the index dropped the worker: nothing applies before a snapshot
    past: tuple[int, ...] = ()  # epochs left behind, newest last


class Incarnations:
    """Per worker: its ``Incarnation``. Not thread-safe (the index holds its lock)."""

    def __init__(self) -> None:
        self._of: dict[str, Incarnation] = {}

    def get(self, worker_id: str) -> Incarnation | None:
        return self._of.get(worker_id)

    def in_sync(self, worker_id: str) -> bool:
        """True unless the worker's entries wait for a snapshot."""
        inc = self._of.get(worker_id)
        return inc is None or inc.synced or inc.dropped

    def batch(self, worker_id: str, epoch: int, seq: int, lost: bool) -> Action:
        inc = self._of.get(worker_id)
        if inc is None:  # first contact (the index started after the worker): no baseline
            self._of[worker_id] = Incarnation(epoch, seq)
            return Action.RESET
        if epoch != inc.epoch:
            if epoch in inc.past:
                return Action.IGNORE
            _move_on(inc, epoch)
            inc.seq = seq
            return Action.IGNORE if inc.dropped else Action.RESET
        if inc.dropped or seq <= inc.seq:
            inc.seq = max(inc.seq, seq)  # a snapshot older than this one would miss it
            return Action.IGNORE
        gap = lost or seq != inc.seq + 1
        inc.seq = seq
        if gap:
            inc.synced = False
            return Action.RESET
        return Action.APPLY

    def snapshot(self, worker_id: str, epoch: int, seq: int) -> bool:
        """Whether a snapshot ``(epoch, seq)`` applies (then the worker is synced)."""
        inc = self._of.get(worker_id)
        if inc is None:
            self._of[worker_id] = Incarnation(epoch, seq, synced=True)
            return True
        if epoch != inc.epoch:
            if epoch in inc.past:
                return False
            _move_on(inc, epoch)
        elif seq <= inc.seq:
            return False
        inc.seq, inc.synced, inc.dropped = seq, True, False
        return True

    def drop(self, worker_id: str) -> None:
        """The index dropped the worker: its current epoch applies no more."""
        inc = self._of.get(worker_id)
        if inc is not None:
            inc.dropped, inc.synced = True, False


def _move_on(inc: Incarnation, epoch: int) -> None:
    inc.past = (*inc.past, inc.epoch)[-MAX_PAST_EPOCHS:]
    inc.epoch, inc.seq, inc.synced = epoch, 0, False
