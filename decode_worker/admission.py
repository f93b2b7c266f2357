"""When a decode request may enter the engine: once its pushed blocks have landed.

A request whose blocks a prefill worker is streaming waits here until that push ends (well or
not) or its transfer timeout passes, whichever comes first; then it is admitted, and the engine
computes whatever did not arrive. The push may end before the request arrives (it is remembered
for a while), and an abort may arrive before the request (a tombstone turns it away).
One timer thread serves every waiting request.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from proto.worker_api import DecodeRequest

REMEMBER_S = 300.0  # how long a finished push or an abort is remembered


@dataclass(slots=True)
class _Waiting:
    req: DecodeRequest
    since: float  # monotonic time the request arrived


class Admissions:
    """``admit(req, outcome)`` is called exactly once per request that is not aborted, off the
    caller's lock: ``outcome`` is "ok", "failed" (the push broke), "timed_out" or "none" (no
    push expected)."""

    def __init__(
        self,
        admit: Callable[[DecodeRequest, str, float], None],
        on_abort: Callable[[str], None],
    ) -> None:
        self._admit = admit  # (request, outcome, seconds waited)
        self._on_abort = on_abort  # a waiting request was aborted
        self._lock = threading.Condition()
        self._waiting: dict[str, _Waiting] = {}
        self._pushed: dict[str, tuple[bool, float]] = {}  # req_id -> (ok, when)
        self._aborted: dict[str, float] = {}  # req_id -> when
        self._timers: list[tuple[float, int, str]] = []  # (deadline, tie, req_id)
        self._tie = itertools.count()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="admissions", daemon=True)
        self._thread.start()

    def arrive(self, req: DecodeRequest) -> None:
        now = time.monotonic()
        with self._lock:
            if self._aborted.pop(req.req_id, None) is not None:
                aborted = True
            else:
                aborted = False
                pushed = self._pushed.pop(req.req_id, None)
                if req.expect_transfer and pushed is None:
                    self._waiting[req.req_id] = _Waiting(req, now)
                    heapq.heappush(
                        self._timers, (now + req.transfer_timeout_s, next(self._tie), req.req_id)
                    )
                    self._lock.notify()
                    return
            self._forget_old(now)
        if aborted:
            self._on_abort(req.req_id)
            return
        if not req.expect_transfer:
            outcome = "none"
        else:
            outcome = "ok" if pushed is not None and pushed[0] else "failed"
        self._admit(req, outcome, 0.0)

    def pushed(self, req_id: str, ok: bool) -> None:
        """The push of ``req_id``'s blocks ended."""
        now = time.monotonic()
        with self._lock:
            w = self._waiting.pop(req_id, None)
            if w is None:
                self._pushed[req_id] = (ok, now)
                self._forget_old(now)
                return
        self._admit(w.req, "ok" if ok else "failed", now - w.since)

    def abort(self, req_id: str) -> bool:
        """Turn ``req_id`` away; True if it was waiting here (it is then never admitted)."""
        now = time.monotonic()
        with self._lock:
            w = self._waiting.pop(req_id, None)
            if w is None:
                self._aborted[req_id] = now
                self._pushed.pop(req_id, None)
                self._forget_old(now)
        if w is not None:
            self._on_abort(req_id)
        return w is not None

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(timeout=5)

    def _forget_old(self, now: float) -> None:
        for table in (self._pushed, self._aborted):
            if len(table) > 64:
                for key in [k for k, v in table.items() if now - _when(v) > REMEMBER_S]:
                    del table[key]

    def _run(self) -> None:
        while True:
            due: list[_Waiting] = []
            with self._lock:
                if self._stop:
                    return
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    _, _, req_id = heapq.heappop(self._timers)
                    w = self._waiting.pop(req_id, None)
                    if w is not None:
                        due.append(w)
                if not due:
                    wait = self._timers[0][0] - now if self._timers else None
                    self._lock.wait(wait)
                    continue
            for w in due:
                self._admit(w.req, "timed_out", time.monotonic() - w.since)


def _when(v: tuple[bool, float] | float) -> float:
    return v[1] if isinstance(v, tuple) else v
