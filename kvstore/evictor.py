"""Host headroom: a background thread keeps a few host slots free ahead of writes.

A write that finds no free slot evicts the least recently used block itself, and the eviction
hands the victim to the disk write policy (a copy of the block into the disk writer's queue)
on the writing thread: the engine's, for an offload. ``HostEvictor`` keeps ``target`` slots
free instead, so that work happens on its own thread. ``wake()`` it after a write; it also
looks every ``interval_s``.
"""

from __future__ import annotations

import logging
import threading

from kvstore.tiers.host import HostTier

logger = logging.getLogger(__name__)


class HostEvictor:
    def __init__(self, host: HostTier, target: int, interval_s: float = 0.05) -> None:
        if target <= 0:
            raise ValueError(f"the evictor's target of free slots must be positive, got {target}")
        self.host = host
        self.target = target
        self.interval_s = interval_s
        self.num_evicted = 0  # blocks this thread evicted
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="strata-host-evictor", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                self._cond.wait(self.interval_s)
                if self._stop:
                    return
            short = self.target - self.host.num_free()
            if short > 0:
                try:
                    self.num_evicted += self.host.evict(short)
                except Exception:  # keep the thread; the next write evicts itself
                    logger.exception("host evictor failed")

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()
