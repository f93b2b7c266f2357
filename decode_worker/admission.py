"""When a decode request may enter the engine: once its pushed blocks have landed.

The router sends a decode request as it places the request, so it usually arrives while the
prefill worker is still streaming the prompt's blocks. It waits here until the push ends (well
or not) or its transfer timeout passes, whichever comes first; then it is admitted, and the
engine computes whatever did not arrive.

The first token is the prefill worker's: it comes at the end of the push stream, and the router
says it too once the prefill returned (``told``), so a push that broke after the token was
sampled loses nothing. Whichever comes first is used. If the router says there is none (its
prefill worker died first), the engine computes the first token too. The push, the router's word
and an abort may each come before the request (remembered for a while). One timer thread serves
every waiting request.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from proto.worker_api import DecodeRequest

REMEMBER_S = 300.0  # how long a push's end, a word or an abort is remembered
_UNSAID = object()  # the router has not said the first token yet


@dataclass(slots=True)
class _Entry:
    req: DecodeRequest | None = None  # None until the request arrives
    since: float = 0.0  # when it arrived
    pushed: tuple[bool, int | None] | None = None  # the push ended: (ok, its first token)
    told: object = _UNSAID  # the router's first token (an int), or None: compute it
    expiries: int = 0  # transfer timeouts passed since it arrived
    aborted: bool = False
    touched: float = 0.0  # for forgetting entries whose request never came


class Admissions:
    """``admit(req, outcome, waited_s)`` is called exactly once per request that is not
    aborted, off the lock, with the request completed (its first token appended, or one more
    token to generate when the engine must compute it); ``outcome`` is "ok", "failed" (the push
    broke), "timed_out" or "none" (no push expected)."""

    def __init__(
        self,
        admit: Callable[[DecodeRequest, str, float], None],
        on_abort: Callable[[str], None],
    ) -> None:
        self._admit = admit
        self._on_abort = on_abort  # a waiting request was aborted
        self._lock = threading.Condition()
        self._entries: dict[str, _Entry] = {}
        self._timers: list[tuple[float, int, str]] = []  # (deadline, tie, req_id)
        self._tie = itertools.count()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="admissions", daemon=True)
        self._thread.start()

    # ---- inputs (any thread) ---------------------------------------------------------------
    def arrive(self, req: DecodeRequest) -> None:
        now = time.monotonic()
        with self._lock:
            e = self._entry(req.req_id, now)
            if e.aborted:
                del self._entries[req.req_id]
                aborted = True
            else:
                aborted = False
                e.req, e.since = req, now
                if req.expect_transfer or req.awaits_first_token:
                    deadline = now + req.transfer_timeout_s
                    heapq.heappush(self._timers, (deadline, next(self._tie), req.req_id))
                    self._lock.notify()
            ready = None if aborted else self._take_if_ready(req.req_id, now)
        if aborted:
            self._on_abort(req.req_id)
        elif ready is not None:
            self._admit(*ready)

    def pushed(self, req_id: str, ok: bool, first_token: int | None = None) -> None:
        """The push of ``req_id``'s blocks ended (with the first token, if it carried one)."""
        now = time.monotonic()
        with self._lock:
            e = self._entry(req_id, now)
            e.pushed = (ok, first_token)
            ready = self._take_if_ready(req_id, now)
        if ready is not None:
            self._admit(*ready)

    def told(self, req_id: str, first_token: int | None, push_coming: bool = True) -> None:
        """The router's word on the first token (None: there is none, compute it), and whether
        a push is still coming (the prefill worker may not have been able to open one)."""
        now = time.monotonic()
        with self._lock:
            e = self._entry(req_id, now)
            e.told = first_token
            if not push_coming and e.pushed is None:
                e.pushed = (False, None)
            ready = self._take_if_ready(req_id, now)
        if ready is not None:
            self._admit(*ready)

    def abort(self, req_id: str) -> bool:
        """Turn ``req_id`` away; True if it was waiting here (it is then never admitted)."""
        now = time.monotonic()
        with self._lock:
            e = self._entry(req_id, now)
            waiting = e.req is not None
            if waiting:
                del self._entries[req_id]
            else:
                e.aborted = True
        if waiting:
            self._on_abort(req_id)
        return waiting

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return sum(1 for e in self._entries.values() if e.req is not None)

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(timeout=5)

    # ---- under the lock ----------------------------------------------------------------------
    def _entry(self, req_id: str, now: float) -> _Entry:
        e = self._entries.get(req_id)
        if e is None:
            if len(self._entries) > 256:
                self._forget_old(now)
            e = self._entries[req_id] = _Entry()
        e.touched = now
        return e

    def _forget_old(self, now: float) -> None:
        stale = [
            k for k, e in self._entries.items() if e.req is None and now - e.touched > REMEMBER_S
        ]
        for k in stale:
            del self._entries[k]

    def _take_if_ready(
        self, req_id: str, now: float
    ) -> tuple[DecodeRequest, str, float] | None:
        """The completed request and its outcome, if it can be admitted now (then forgotten)."""
        e = self._entries.get(req_id)
        if e is None or e.req is None:
            return None
        req = e.req
        if req.expect_transfer and e.pushed is None and not e.expiries:
            return None  # blocks still on their way
        outcome = "none"
        if req.expect_transfer:
            outcome = "timed_out" if e.pushed is None else ("ok" if e.pushed[0] else "failed")
        if req.awaits_first_token:
            token = e.pushed[1] if e.pushed is not None and e.pushed[1] is not None else e.told
            if token is _UNSAID:
                if e.expiries < 2:
                    return None  # the token is on its way (push or router)
                token = None  # nobody said it for two timeouts: compute it here
            if token is None:  # no first token anywhere: the engine samples it
                more = replace(req.sampling, max_tokens=req.sampling.max_tokens + 1)
                req = replace(req, sampling=more)
            else:
                assert isinstance(token, int)
                req = replace(req, token_ids=(*req.token_ids, token))
            req = replace(req, awaits_first_token=False)
        del self._entries[req_id]
        return req, outcome, now - e.since

    # ---- the timer thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            due: list[tuple[DecodeRequest, str, float]] = []
            with self._lock:
                if self._stop:
                    return
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    _, _, req_id = heapq.heappop(self._timers)
                    e = self._entries.get(req_id)
                    if e is None or e.req is None:
                        continue
                    e.expiries += 1
                    ready = self._take_if_ready(req_id, now)
                    if ready is not None:
                        due.append(ready)
                    elif e.req.awaits_first_token:  # waiting for the router's word: once more
                        heapq.heappush(
                            self._timers,
                            (now + e.req.transfer_timeout_s, next(self._tie), req_id),
                        )
                if not due:
                    wait = self._timers[0][0] - now if self._timers else None
                    self._lock.wait(wait)
                    continue
            for ready in due:
                self._admit(*ready)
