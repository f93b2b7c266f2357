"""Which workers the router places requests on, and how they leave and come back.

A worker is ``up`` (placed on), ``down`` (its process died or cannot be reached: Ray restarts
it), ``retiring`` (``strata scale`` is removing it: no new requests, its running ones finish) or
``gone``. A worker leaves placement the moment the router learns it is down, from whichever
signal comes first (``mark_down``): its health stream breaks (``router.liveness``: milliseconds
after its process dies), a decode worker's output stream breaks, or a Ray call to it fails with
``RayActorError``. It leaves the block index and the cost model at once, every request waiting
on it is woken (``Worker.gone``), and a thread waits for it to come back: Ray's ``info`` call
answered (its new address and start-up measurements) and a ``Health.Check`` answered SERVING;
then its health stream and (decode workers) output stream are opened again and its index entries
rebuilt from the blocks it holds (its disk tier survives a restart). Every change of state
happens under one lock; the streams live on the router's event loop.

Resync (``resync``): a snapshot of the worker's blocks replaces its index entries. Snapshots and
event batches carry the worker's epoch (a new one every start) and a number, and the index
applies a snapshot only if no newer batch has been applied (``router.incarnation``): when the
event poller got ahead, another snapshot is taken. A resync is also asked for when the index
finds a worker's entries incomplete (a batch lost, a restart nobody noticed:
``request_resync``). A worker's resyncs run one at a time (``Worker.sync_lock``), and one that
was overtaken by the worker going down applies nothing (``Worker.downs``, checked and changed
under ``Worker.index_lock`` with the index call).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError

from kvstore.keys import BlockHash
from proto.vocab import Role, StrEnum
from proto.worker_api import BlockSnapshot, WorkerInfo
from router.config import BackendConfig
from router.errors import NoWorkerError
from router.event_loop import RouterLoop
from router.index import GlobalBlockIndex
from router.liveness import HealthWatch, check_serving
from router.metrics import RouterMetrics
from router.outputs import OutputStream
from router.placement import CostModel, WorkerProfile

logger = logging.getLogger(__name__)



class WorkerState(StrEnum):
    """Where a worker stands in placement."""

    UP = "up"  # placed on
    DOWN = "down"  # its process died or stopped answering: waits to come back
    RETIRING = "retiring"  # being scaled away: its requests finish, no new ones come
    GONE = "gone"  # left the service


# what the runs of requests are doing on a worker (counted for Stats and the soak)
PHASES = ("prefill", "awaiting_first", "decoding")


@dataclass(slots=True)
class Worker:
    info: WorkerInfo
    handle: Any  # Ray actor handle
    state: WorkerState = WorkerState.UP
    in_flight: int = 0
    outputs: OutputStream | None = None  # decode workers' token stream
    watch: HealthWatch | None = None  # the health stream that breaks when the process dies
    gone: asyncio.Future[str] | None = None  # resolves (with the reason) when it leaves UP
    restarts: int = 0  # times it came back
    downs: int = 0  # times it went down (a resync started before the last one is void)
    resync_due: bool = False  # a resync was asked for and has not run yet
    sync_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # resyncs
    index_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # its entries
    down_at: float = 0.0  # wall clock: it last left placement
    up_at: float = 0.0  # wall clock: it last entered placement
    down_reason: str = ""
    runs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def role(self) -> str:
        return self.info.role

    @property
    def alive(self) -> bool:
        return self.state == WorkerState.UP


class Membership:
    def __init__(
        self,
        config: BackendConfig,
        secret: str | None,
        index: GlobalBlockIndex,
        cost: CostModel,
        loop: RouterLoop,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.config = config
        self.secret = secret
        self.index = index
        self.cost = cost
        self.loop = loop
        self.metrics = metrics
        self.lock = threading.Lock()
        self.workers: dict[str, Worker] = {}
        self.fingerprint: bytes | None = None
        self._stop = threading.Event()

    # ---- joining ---------------------------------------------------------------------------
    def join(self, workers: list[tuple[str, Any]], timeout_s: float = 600.0) -> list[str]:
        """Take new workers in ((role, handle) pairs; waits for them to have started). Not on
        the router's loop (it blocks)."""
        infos: list[WorkerInfo] = ray.get([h.info.remote() for _, h in workers], timeout=timeout_s)
        for (role, _), info in zip(workers, infos):
            if info.role != role:
                raise ValueError(f"{info.worker_id} is a {info.role} worker, listed as {role}")
            if self.fingerprint is None:
                self.fingerprint = info.fingerprint
            if info.fingerprint != self.fingerprint:
                raise ValueError(
                    f"workers serve different models: {info.worker_id} differs (fingerprints "
                    "must match)"
                )
            with self.lock:
                old = self.workers.get(info.worker_id)
                if old is not None and old.state not in (WorkerState.GONE,):
                    raise ValueError(f"worker {info.worker_id} is already in the service")
        entries = [Worker(info, handle) for (_, handle), info in zip(workers, infos)]
        for w in entries:
            self._bring_up(w)
        return [w.worker_id for w in entries]

    def _bring_up(self, w: Worker) -> None:
        """Health stream, output stream (decode), index entries, cost profile; then it is placed
        on. ``NoWorkerError`` if its streams do not open."""
        self.loop.run(self._open_streams(w), timeout=2 * self.config.connect_timeout_s + 5)
        try:
            if not self.resync(w, w.downs):
                raise NoWorkerError(f"no snapshot of worker {w.worker_id}'s blocks applied")
        except BaseException:
            with self.lock:
                outputs, watch, gone = w.outputs, w.watch, w.gone
                w.outputs = w.watch = w.gone = None
            self.loop.call_soon(_close_streams, outputs, watch, gone, "could not rejoin")
            raise
        profile = WorkerProfile(
            w.worker_id,
            w.info.prefill_tokens_per_s,
            load_bytes_per_s={k: v for k, v in w.info.tier_bytes_per_s.items() if v > 0},
        )
        with self.lock:
            profile.queue_depth = w.in_flight
            self.cost.update(profile)
            # (in_flight is not reset: the requests of its last life still count themselves out)
            w.state, w.up_at = WorkerState.UP, time.time()
            self.workers[w.worker_id] = w
        # A stream that broke while it was coming up found it not UP yet: look again.
        watch, outputs = w.watch, w.outputs
        if watch is None or watch.closed or (outputs is not None and not outputs.connected):
            self.mark_down(w.worker_id, "its streams broke while it came back")

    async def _open_streams(self, w: Worker) -> None:
        address = w.info.kv_address
        if address is None:
            raise NoWorkerError(f"worker {w.worker_id} has no gRPC address")
        timeout = self.config.connect_timeout_s
        watch = HealthWatch(w.worker_id, address, self._on_watch_lost)
        outputs = None
        try:
            if not await watch.wait_serving(timeout):
                raise NoWorkerError(f"no health stream from worker {w.worker_id}")
            if w.role == Role.DECODE:
                outputs = OutputStream(
                    w.worker_id,
                    w.info.outputs_address or address,
                    self.secret,
                    on_broken=self._on_stream_broken,
                    on_overrun=self.on_overrun,
                    max_buffered_tokens=self.config.max_buffered_tokens,
                )
                if not await outputs.wait_connected(timeout):
                    raise NoWorkerError(f"no output stream from decode worker {w.worker_id}")
        except BaseException:
            watch.close()
            if outputs is not None:
                outputs.close()
            raise
        w.watch, w.outputs = watch, outputs
        w.gone = asyncio.get_running_loop().create_future()

    RESYNC_TRIES = 5  # snapshots taken while the event poller keeps getting ahead

    def resync(self, w: Worker, downs: int) -> bool:
        """Replace ``w``'s index entries with what it holds now (its pending events included),
        unless it went down since ``downs`` was read. True once a snapshot applied."""
        with w.sync_lock:
            for _ in range(self.RESYNC_TRIES):
                snap: BlockSnapshot = ray.get(
                    w.handle.snapshot_blocks.remote(), timeout=self.config.call_timeout_s
                )
                blocks = {tier: [BlockHash(h) for h in hs] for tier, hs in snap.blocks.items()}
                with w.index_lock:
                    if w.downs != downs:
                        return False  # it went down meanwhile: this snapshot is void
                    applied = self.index.replace_worker(w.worker_id, blocks, snap.epoch, snap.seq)
                if applied:
                    return True
        logger.warning("worker %s: no snapshot of its blocks applied in %d tries",
                       w.worker_id, self.RESYNC_TRIES)
        return False

    def request_resync(self, worker_id: str) -> None:
        """The index found ``worker_id``'s entries incomplete: resync it (in a thread, once)."""
        with self.lock:
            w = self.workers.get(worker_id)
            if w is None or w.state != WorkerState.UP or w.resync_due:
                return
            w.resync_due = True
            downs = w.downs

        def run() -> None:
            w.resync_due = False
            try:
                self.resync(w, downs)
            except Exception:  # a worker that died is handled by mark_down
                logger.warning("resync of worker %s failed", worker_id, exc_info=True)

        threading.Thread(target=run, name=f"resync-{worker_id}", daemon=True).start()

    # ---- queries ---------------------------------------------------------------------------
    def alive(self, role: str) -> list[str]:
        with self.lock:
            return [
                w.worker_id
                for w in self.workers.values()
                if w.role == role and w.alive and (w.outputs is None or w.outputs.connected)
            ]

    def restarting(self, role: str) -> list[str]:
        """Workers of ``role`` that are down and expected back (Ray restarts them)."""
        with self.lock:
            return [
                w.worker_id
                for w in self.workers.values()
                if w.role == role and w.state == WorkerState.DOWN
            ]

    def get(self, worker_id: str) -> Worker:
        return self.workers[worker_id]

    def snapshot(self) -> list[Worker]:
        with self.lock:
            return list(self.workers.values())

    def add_in_flight(self, worker_id: str, delta: int) -> None:
        with self.lock:
            w = self.workers[worker_id]
            w.in_flight += delta
            profile = self.cost.profiles.get(worker_id)
            if profile is not None:
                profile.queue_depth = w.in_flight

    def describe(self, role: str) -> str:
        """The workers of ``role`` and their states, for error messages."""
        now = time.time()
        parts = []
        for w in self.snapshot():
            if w.role != role:
                continue
            if w.state == WorkerState.DOWN:
                parts.append(f"{w.worker_id} down for {now - w.down_at:.1f} s ({w.down_reason})")
            else:
                parts.append(f"{w.worker_id} {w.state}")
        return ", ".join(parts) or f"no {role} workers"

    # ---- failures --------------------------------------------------------------------------
    def mark_down(self, worker_id: str, why: object) -> bool:
        """``worker_id`` died or cannot be reached: out of placement and the index now, its
        waiting requests woken; back once it answers a health call. Any thread; False if it
        was not up."""
        w = self.workers.get(worker_id)
        if w is None:
            return False
        with self.lock:
            if w.state != WorkerState.UP:
                return False
            w.state = WorkerState.DOWN
            w.down_at = time.time()
            w.down_reason = str(why).splitlines()[0][:200] if str(why) else type(why).__name__
            self.cost.remove(worker_id)
            outputs, watch, gone = w.outputs, w.watch, w.gone
            w.outputs = w.watch = w.gone = None
        logger.warning("worker %s is down (%s); out of placement", worker_id, w.down_reason)
        if self.metrics is not None:
            self.metrics.workers_down_total.labels(role=w.role).inc()
        with w.index_lock:  # a resync in flight applies before this or not at all
            w.downs += 1
            self.index.remove_worker(worker_id)
        self.loop.call_soon(_close_streams, outputs, watch, gone, w.down_reason)
        threading.Thread(
            target=self._revive, args=(w,), name=f"revive-{worker_id}", daemon=True
        ).start()
        return True

    def _on_stream_broken(self, stream: OutputStream, error: BaseException) -> None:
        w = self.workers.get(stream.worker_id)
        if w is not None and w.outputs is stream:
            self.mark_down(stream.worker_id, error)

    def _on_watch_lost(self, watch: HealthWatch, reason: str) -> None:
        w = self.workers.get(watch.worker_id)
        if w is not None and w.watch is watch:
            self.mark_down(watch.worker_id, reason)

    def on_overrun(self, worker_id: str, req_id: str) -> None:
        w = self.workers[worker_id]
        if w.alive:
            w.handle.abort.remote(req_id)  # its client is too slow: free the worker's blocks

    def _revive(self, w: Worker) -> None:
        """Wait for ``w`` to answer again (Ray restarts a process that died); take it back in.
        Gives up when the actor is dead for good (killed without restart, or its node gone) or
        ``revive_timeout_s`` passed."""
        end = time.monotonic() + self.config.revive_timeout_s
        died = 0
        while not self._stop.is_set() and time.monotonic() < end:
            try:
                info: WorkerInfo = ray.get(
                    w.handle.info.remote(), timeout=self.config.call_timeout_s
                )
            except ActorDiedError:
                died += 1  # right after a crash Ray may not know yet that it restarts it
                if died >= 3:
                    break
                self._stop.wait(1.0)
                continue
            except Exception:  # restarting (ActorUnavailableError) or slow
                self._stop.wait(0.5)
                continue
            with self.lock:
                if w.state != WorkerState.DOWN:
                    return  # retired meanwhile
            if info.kv_address is None or not check_serving(info.kv_address, 5.0):
                self._stop.wait(0.5)
                continue
            restarted = info.pid != w.info.pid or info.started_at != w.info.started_at
            w.info = info
            try:
                self._bring_up(w)
            except Exception as e:  # not ready yet: try again
                logger.warning("worker %s answered but could not rejoin yet: %s", w.worker_id, e)
                with self.lock:
                    w.state = WorkerState.DOWN
                self._stop.wait(1.0)
                continue
            w.restarts += int(restarted)
            logger.warning(
                "worker %s is back (pid %d, epoch %d, %.1f s after it left placement)",
                w.worker_id,
                info.pid,
                info.epoch,
                w.up_at - w.down_at,
            )
            return
        with self.lock:
            if w.state == WorkerState.DOWN:
                w.state = WorkerState.GONE
        logger.warning("worker %s is gone for good", w.worker_id)

    # ---- leaving ---------------------------------------------------------------------------
    def retire(self, worker_ids: list[str], drain_timeout_s: float) -> list[Any]:
        """Stop placing on these workers, wait (bounded) for their requests to end, and drop
        them; returns their handles for the caller to stop."""
        with self.lock:
            unknown = [wid for wid in worker_ids if wid not in self.workers]
            if unknown:
                raise ValueError(f"no such workers: {unknown}")
            for wid in worker_ids:
                w = self.workers[wid]
                if w.state in (WorkerState.UP, WorkerState.DOWN):
                    w.state = WorkerState.RETIRING
                    self.cost.remove(wid)
        end = time.monotonic() + drain_timeout_s
        while time.monotonic() < end:
            with self.lock:
                busy = [wid for wid in worker_ids if self.workers[wid].in_flight > 0]
            if not busy:
                break
            time.sleep(0.1)
        handles = []
        for wid in worker_ids:
            w = self.workers[wid]
            self.index.remove_worker(wid)
            with self.lock:
                w.state = WorkerState.GONE
                outputs, watch, gone = w.outputs, w.watch, w.gone
                w.outputs = w.watch = w.gone = None
            self.loop.call_soon(_close_streams, outputs, watch, gone, "retired")
            handles.append(w.handle)
        return handles

    def close(self) -> None:
        self._stop.set()
        for w in self.snapshot():
            outputs, watch, gone = w.outputs, w.watch, w.gone
            w.outputs = w.watch = w.gone = None
            self.loop.call_soon(_close_streams, outputs, watch, gone, "left")


def _close_streams(
    outputs: OutputStream | None,
    watch: HealthWatch | None,
    gone: asyncio.Future[str] | None,
    why: str,
) -> None:
    """On the loop: end a worker's streams and wake the requests waiting on it."""
    if outputs is not None:
        outputs.close(f"is down ({why})")
    if watch is not None:
        watch.close()
    if gone is not None and not gone.done():
        gone.set_result(why)
