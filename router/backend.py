"""``RayBackend``: the router's view of the cluster — Ray actor handles of the prefill and decode
workers (``router.membership``: who is up, their health and output streams), the global block
index fed by their events, and the cost model that places requests.

Each request is one ``RequestRun`` (``router.request_run``): placement, prefill, the decode
worker's token stream, and every retry and migration when a worker is lost on the way. The
request path runs on the router's event loop (``router.event_loop``); the event poller and the
``Stats`` calls into the workers are threads (they block on Ray). The membership's state (alive
flags, in-flight counts, queue depths) changes under one lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray.exceptions import RayActorError

from proto.vocab import Role
from router.config import BackendConfig
from router.event_loop import RouterLoop
from router.index import GlobalBlockIndex
from router.membership import PHASES, Membership, WorkerState
from router.metrics import RouterMetrics
from router.placement import CostModel
from router.request_run import RequestRun
from router.types import GenRequest, TokenDelta

logger = logging.getLogger(__name__)

WORKER_DIED = (RayActorError,)
__all__ = ["BackendConfig", "RayBackend"]


class RayBackend:
    def __init__(
        self,
        workers: list[tuple[str, Any]],
        config: BackendConfig | None = None,
        secret: str | None = None,
        loop: RouterLoop | None = None,
        metrics: RouterMetrics | None = None,
    ) -> None:
        """``workers``: (role, actor handle) pairs, role "prefill" or "decode"; ``loop``: the
        event loop the request path runs on (the process's shared one by default)."""
        self.config = config or BackendConfig()
        self.loop = loop if loop is not None else RouterLoop.shared()
        self.metrics = metrics if metrics is not None else RouterMetrics()
        if not any(role == Role.DECODE for role, _ in workers):
            raise ValueError("the service needs at least one decode worker")
        first = ray.get(workers[0][1].info.remote(), timeout=600)
        self.fingerprint: bytes = first.fingerprint
        self.block_size: int = first.block_size
        self.vocab_size: int = first.vocab_size
        self.index = GlobalBlockIndex()
        self.cost = CostModel(self.block_size, first.block_nbytes)
        self.members = Membership(
            self.config, secret, self.index, self.cost, self.loop, self.metrics
        )
        self._runs: dict[str, RequestRun] = {}  # live requests (the loop's thread only)
        self._lock = threading.Lock()
        try:
            self.members.join(workers)
        except BaseException:
            self.members.close()
            raise
        self.max_model_len: int = min(w.info.max_model_len for w in self.members.snapshot())
        self.colocated = False
        self._scaled()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_events, name="event-poller", daemon=True)
        self._poller.start()

    def _scaled(self) -> None:
        """After a scale: colocated when no prefill worker is configured (decode workers then
        compute prompts too, no handoff). Failures do not change it: a service whose prefill
        workers all died answers UNAVAILABLE until they are back."""
        self.colocated = not any(
            w.role == Role.PREFILL and w.state != WorkerState.GONE for w in self.members.snapshot()
        )

    # ---- membership ----------------------------------------------------------------------
    def _alive(self, role: str) -> list[str]:
        return self.members.alive(role)

    def _mark_dead(self, worker_id: str, why: object) -> None:
        self.members.mark_down(worker_id, why)

    def add_workers(self, workers: list[tuple[str, Any]]) -> list[str]:
        """Take started worker actors in (``strata scale``)."""
        ids = self.members.join(workers)
        self._scaled()
        with self._lock:
            self.max_model_len = min(
                [self.max_model_len] + [self.members.get(w).info.max_model_len for w in ids]
            )
        return ids

    def retire_workers(self, worker_ids: list[str], drain_timeout_s: float = 60.0) -> list[Any]:
        """Stop placing on ``worker_ids``, let their requests finish (bounded), drop them;
        returns their handles to stop."""
        left = [w for w in self.members.snapshot() if w.worker_id not in worker_ids]
        for role in (Role.DECODE,):
            if not any(w.role == role and w.state != WorkerState.GONE for w in left):
                raise ValueError(f"the service needs at least one {role} worker")
        handles = self.members.retire(worker_ids, drain_timeout_s)
        self._scaled()
        return handles

    def _observe_network(self) -> None:
        """Worker-to-worker bandwidth, measured from the pushes so far (0 until one happened:
        then no pull is ever planned)."""
        nbytes = seconds = 0.0
        for w in self.members.snapshot():
            if w.alive and w.role == Role.PREFILL:
                try:
                    s = ray.get(w.handle.stats.remote(), timeout=self.config.call_timeout_s)
                except Exception:  # measured again next time
                    continue
                nbytes += s.get("push_bytes", 0.0) - s.get("push_shm_bytes", 0.0)
                seconds += s.get("push_seconds", 0.0)
        if nbytes > 0 and seconds > 0:
            with self.members.lock:
                for profile in self.cost.profiles.values():
                    profile.net_bytes_per_s = nbytes / seconds

    def _poll_events(self) -> None:
        rounds = 0
        while not self._stop.wait(self.config.event_poll_s):
            rounds += 1
            if rounds % 25 == 0:
                self._observe_network()
            for w in self.members.snapshot():
                if not w.alive:
                    continue
                try:
                    events = ray.get(
                        w.handle.drain_events.remote(), timeout=self.config.call_timeout_s
                    )
                except WORKER_DIED as e:
                    self._mark_dead(w.worker_id, e)
                    continue
                except Exception:  # a slow worker is retried next round
                    logger.debug("event poll of %s failed", w.worker_id, exc_info=True)
                    continue
                if not self.index.apply_batch(w.worker_id, events):
                    self.members.request_resync(w.worker_id)  # its entries are incomplete

    def sync_index(self) -> None:
        """Pull every worker's pending events now (tests and benchmarks use it)."""
        for w in self.members.snapshot():
            if w.alive:
                events = ray.get(w.handle.drain_events.remote(), timeout=self.config.call_timeout_s)
                if not self.index.apply_batch(w.worker_id, events):
                    self.members.resync(w, w.downs)

    # ---- the Backend protocol ------------------------------------------------------------
    def healthy(self) -> bool:
        decode, prefill = self._alive(Role.DECODE), self._alive(Role.PREFILL)
        return bool(decode) and (self.colocated or bool(prefill))

    def stats(self) -> dict[str, dict[str, float]]:
        """Every worker's own stats (a Ray call each: not on the loop) and the router's view of
        it: alive, restarts, when it last left and entered placement (wall clock), when its
        process was ready, in-flight requests, and the requests' phases there."""
        out: dict[str, dict[str, float]] = {}
        for w in self.members.snapshot():
            if w.state == WorkerState.GONE:
                continue
            s: dict[str, float] = {}
            if w.alive:
                try:
                    got = ray.get(w.handle.stats.remote(), timeout=self.config.call_timeout_s)
                    s = {k: float(v) for k, v in got.items()}
                except WORKER_DIED as e:
                    self._mark_dead(w.worker_id, e)
            with self.members.lock:
                s["alive"] = float(w.alive)
                s["in_flight"] = float(w.in_flight)
                s["pid"] = float(w.info.pid)
            s["restarts"] = float(w.restarts)
            s["down_at"], s["up_at"] = w.down_at, w.up_at
            s["started_at"] = w.info.started_at
            s.update({f"requests_{phase}": float(w.runs[phase]) for phase in PHASES})
            if w.alive:
                s["index_blocks"] = float(self.index.num_blocks(w.worker_id))
            if w.outputs is not None:
                s["output_stream_messages"] = float(w.outputs.num_messages)
            out[w.worker_id] = s
        return out

    def cancel(self, req_id: str) -> None:
        """Stop ``req_id`` (its client left); any thread."""
        self.loop.call_soon(self._cancel, req_id)

    def _cancel(self, req_id: str) -> None:
        run = self._runs.get(req_id)
        if run is not None:
            run.cancel()

    async def generate(
        self, req: GenRequest, context_deadline_s: float
    ) -> AsyncIterator[TokenDelta]:
        """The request's token deltas (on the router's loop); the last has finish_reason and
        usage. Closing the iterator early stops the request on its workers."""
        run = RequestRun(self, req, context_deadline_s)
        self._runs[req.req_id] = run
        try:
            async for delta in run.deltas():
                yield delta
        finally:
            if self._runs.get(req.req_id) is run:
                del self._runs[req.req_id]

    def close(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            self._poller.join(timeout=5)
        self.members.close()
