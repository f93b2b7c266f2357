"""``RequestRun``: one request's way through the cluster, from placement to its last token, its
retries and migrations included. It runs on the router's event loop (``router.event_loop``).

An attempt places the request's context (the prompt, then every token the client got so far)
and streams what the workers generate:

1. choose a prefill worker P (lowest predicted TTFT) and a decode worker D; send D the request
   at once (it admits it when the pushed blocks and the first token have landed);
2. ``prefill`` on P (a Ray call; P streams the blocks to D while it computes and returns the
   first token), which the client gets at once;
3. D's tokens arrive on its output stream (``router.outputs``) and go to the client.

Without prefill workers (colocated) D computes the context itself. When a worker is lost the
run goes on; the client sees neither an error nor a repeated or missing token:

- P lost (its health stream broke, or the call failed with ``RayActorError``): D (or another
  decode worker if D is gone too) computes what it lacks, the first token included; the blocks
  pushed so far are cached there;
- D lost (its output stream broke): the next attempt places prompt + the tokens streamed so far
  on live workers; the new worker computes them again, or loads them where cached. Greedy and
  seeded sampling draw each token from its position alone (``engine.sampling``), so the
  continuation equals an uninterrupted run.

An error reaches the client only when no worker of a role is up (after waiting up to
``no_worker_wait_s`` for one that restarts), when the request's deadline passes, or when the
request lost ``max_retries`` workers. Workers know each placement by its own id (the request's
id, then ``<id>/2``, ...): a worker cut off from the router may still run an earlier one. A
failure's message ends with a tag the soak reads:
``[cause=no_worker role=decode phase=decoding worker=decode-0 attempts=2]``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Protocol

from ray.exceptions import RayActorError, RayTaskError

from kvstore.keys import BlockHash, hash_prompt_blocks
from proto.vocab import FinishReason, Role
from proto.worker_api import (
    DecodeRequest,
    PrefillRequest,
    PrefillResult,
    SamplingParams,
)
from router.config import BackendConfig
from router.errors import NoWorkerError, RequestTimeoutError
from router.event_loop import first_of, ray_result
from router.index import GlobalBlockIndex
from router.membership import Membership
from router.metrics import RouterMetrics
from router.outputs import TokenQueue, WorkerLostError
from router.placement import CostModel, Placement
from router.run_usage import RunUsage
from router.types import GenRequest, TokenDelta

logger = logging.getLogger(__name__)


def failure_tag(**fields: object) -> str:
    """``[k=v ...]``: what a failed request's status message ends with (``bench/soak.py``
    parses it)."""
    return "[" + " ".join(f"{k}={v}" for k, v in fields.items() if v not in (None, "")) + "]"


class _Lost(Exception):
    """The worker serving the request was lost: the run takes it elsewhere."""

    def __init__(self, role: str, worker_id: str, phase: str, why: object) -> None:
        super().__init__(f"{role} worker {worker_id} lost in phase {phase}: {why}")
        self.role = role
        self.worker_id = worker_id
        self.phase = phase


class Cluster(Protocol):
    """What a run reads of the router's cluster view (``router.backend.RayBackend``)."""

    block_size: int
    fingerprint: bytes
    colocated: bool
    config: BackendConfig
    cost: CostModel
    index: GlobalBlockIndex
    members: Membership
    metrics: RouterMetrics


class RequestRun:
    def __init__(self, cluster: Cluster, req: GenRequest, deadline_s: float) -> None:
        self.c = cluster
        self.req = req
        self.t0 = time.monotonic()
        self.end = self.t0 + deadline_s
        self.tokens: list[int] = []  # every token the client got, in order
        self.usage = RunUsage(len(req.prompt_token_ids))
        self.attempts = 0
        self.lost: list[_Lost] = []  # the workers lost under it
        self.cancelled = False
        self._prefilling: tuple[str, str] | None = None  # (worker, id) of a prefill in flight
        self._num_ids = 0
        self._where: tuple[str, str] | None = None  # (worker, phase) counted in Worker.runs

    # ---- the whole run ---------------------------------------------------------------------
    async def deltas(self) -> AsyncIterator[TokenDelta]:
        """Token deltas; the last one has finish_reason and usage."""
        try:
            while True:
                self.attempts += 1
                try:
                    async for delta in self._attempt():
                        yield delta
                    return
                except _Lost as lost:
                    self._moved(lost)
                    if self.cancelled:
                        yield TokenDelta((), FinishReason.ABORT, self.usage.done(len(self.tokens)))
                        return
        finally:
            self._at(None, "")

    def cancel(self) -> None:
        """The client left (or its deadline passed): stop any prefill in flight now (the decode
        worker is told as the run unwinds)."""
        self.cancelled = True
        if self._prefilling is not None:
            p_id, rid = self._prefilling
            w = self.c.members.get(p_id)
            if w.alive:
                w.handle.abort.remote(rid)

    def _new_id(self) -> str:
        """The id the workers know this placement by: the request's own at first, a new one for
        each later placement (a worker that was cut off may still hold the earlier one)."""
        self._num_ids += 1
        return self.req.req_id if self._num_ids == 1 else f"{self.req.req_id}/{self._num_ids}"

    def _moved(self, lost: _Lost) -> None:
        self.lost.append(lost)
        m = self.c.metrics
        m.migrations_total.labels(role=lost.role, phase=lost.phase).inc()
        m.retries_total.labels(reason="worker_lost").inc()
        logger.warning(
            "request %s: %s; going on elsewhere after %d tokens (attempt %d)",
            self.req.req_id,
            lost,
            len(self.tokens),
            self.attempts + 1,
        )
        if len(self.lost) > self.c.config.max_retries:
            raise NoWorkerError(
                f"request {self.req.req_id} lost {len(self.lost)} workers (last: {lost}) "
                + self._tag("retries_exhausted", lost.role, lost.phase, lost.worker_id)
            )

    def _tag(self, cause: str, role: str = "", phase: str = "", worker: str | None = "") -> str:
        return failure_tag(
            cause=cause,
            role=role,
            phase=phase,
            worker=worker,
            attempts=self.attempts,
            lost=",".join(f"{x.worker_id}@{x.phase}" for x in self.lost),
        )

    def _remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise RequestTimeoutError(
                f"request {self.req.req_id} ran out of time " + self._tag("deadline")
            )
        return left

    def _at(self, worker_id: str | None, phase: str) -> None:
        """Count the run on (worker, phase) in the workers' stats (None: nowhere)."""
        members = self.c.members
        if self._where is not None:
            w = members.workers.get(self._where[0])
            if w is not None:
                w.runs[self._where[1]] -= 1
        self._where = None
        if worker_id is not None:
            members.get(worker_id).runs[phase] += 1
            self._where = (worker_id, phase)

    # ---- one attempt -----------------------------------------------------------------------
    async def _attempt(self) -> AsyncIterator[TokenDelta]:
        c, req = self.c, self.req
        context = [*req.prompt_token_ids, *self.tokens]
        remaining = req.max_tokens - len(self.tokens)
        hashes = hash_prompt_blocks(context, c.block_size, c.fingerprint, req.cache_salt)
        rid = self._new_id()
        if c.colocated or (self.lost and not c.members.alive(Role.PREFILL)):
            # no prefill worker: a decode worker computes the context (a moved request goes on
            # this way rather than wait for one)
            worker, queue = await self._start_colocated(rid, hashes, context, remaining)
            async for delta in self._decode(worker, rid, queue, context, recompute=bool(self.lost)):
                yield delta
            return
        prefill_ids = await self._alive_or_wait(Role.PREFILL)
        placement = c.cost.choose_prefill(prefill_ids, c.index, hashes, len(context))
        early: TokenQueue | None = None
        d_id: str | None = None
        if remaining > 1:  # D gets it now; it admits it once the blocks and first token landed
            d_id, early = await self._start_somewhere(rid, hashes, context, remaining - 1)
        try:
            try:
                res = await self._prefill(rid, placement, context, remaining, d_id, hashes)
            except _Lost as lost:
                if d_id is None or early is None:
                    raise  # nothing to decode: the next attempt prefills it elsewhere
                # P died. D holds the blocks pushed so far, maybe the first token too (the
                # push's last frame carries it): it starts over under a new id and computes
                # what it lacks, the first token included, so the client gets every token.
                self.lost.append(lost)
                c.metrics.migrations_total.labels(role=Role.PREFILL, phase=lost.phase).inc()
                logger.warning("request %s: %s; a decode worker computes it", req.req_id, lost)
                self._end_decode(d_id, rid, abort=True)
                early = None
                rid = self._new_id()
                d_id, queue = await self._start_colocated(rid, hashes, context, remaining, d_id)
                async for delta in self._decode(d_id, rid, queue, context, recompute=True):
                    yield delta
                return
            first = res.first_token
            self._took_prefill(res, len(context))
            self.tokens.append(first)
            if res.finished:
                yield TokenDelta((first,), res.finish_reason, self.usage.done(len(self.tokens)))
                return
            assert d_id is not None and early is not None
            c.members.get(d_id).handle.first_token.remote(rid, first, res.num_blocks_to_push > 0)
            yield TokenDelta((first,))
            queue, early = early, None
            async for delta in self._decode(d_id, rid, queue, [*context, first]):
                yield delta
        finally:
            if early is not None and d_id is not None:  # it will not decode there after all
                self._end_decode(d_id, rid, abort=True)

    async def _alive_or_wait(self, role: str) -> list[str]:
        """The workers of ``role`` that are up; if none is but one restarts, wait for it (up
        to ``no_worker_wait_s`` and the deadline)."""
        members = self.c.members
        alive = members.alive(role)
        if alive:
            return alive
        until = min(self.end, time.monotonic() + self.c.config.no_worker_wait_s)
        waited = False
        while time.monotonic() < until and members.restarting(role):
            if not waited:
                self.c.metrics.retries_total.labels(reason="waited_for_worker").inc()
                waited = True
            await asyncio.sleep(0.05)
            alive = members.alive(role)
            if alive:
                return alive
        self._remaining()  # the deadline passed: say that
        raise NoWorkerError(
            f"no {role} worker can serve request {self.req.req_id} ({members.describe(role)}) "
            + self._tag("no_worker", role, "placing")
        )

    async def _start_colocated(
        self,
        rid: str,
        hashes: list[BlockHash],
        context: list[int],
        max_tokens: int,
        prefer: str | None = None,
    ) -> tuple[str, TokenQueue]:
        """Send the request to the decode worker that computes its context fastest (the one
        holding most of it; ``prefer`` if it is up) whose output stream is up."""
        c = self.c
        tried: list[str] = []
        while True:
            alive = await self._decode_candidates(tried)
            placement = c.cost.choose_prefill(alive, c.index, hashes, len(context))
            d_id = prefer if prefer in alive else placement.worker_id
            try:
                queue = self._start(d_id, rid, context, max_tokens, expect_transfer=False)
            except WorkerLostError:  # its stream went down just now
                tried.append(d_id)
                c.metrics.retries_total.labels(reason="stream_down").inc()
                continue
            if d_id == placement.worker_id and placement.plan.load_s > 0:  # move them up now
                c.members.get(d_id).handle.prefetch.remote(hashes)
            return d_id, queue

    async def _decode_candidates(self, tried: list[str]) -> list[str]:
        """The decode workers up (waiting for one while a worker restarts) that were not tried
        yet; ``NoWorkerError`` when none is left."""
        alive = [w for w in await self._alive_or_wait(Role.DECODE) if w not in tried]
        if not alive:
            raise NoWorkerError(
                f"no decode worker could take request {self.req.req_id} "
                f"({self.c.members.describe(Role.DECODE)}) "
                + self._tag("no_worker", Role.DECODE, "placing")
            )
        return alive

    async def _start_somewhere(
        self, rid: str, hashes: list[BlockHash], context: list[int], max_tokens: int
    ) -> tuple[str, TokenQueue]:
        """Send the request to the best decode worker whose output stream is up (it awaits the
        push and the first token)."""
        tried: list[str] = []
        while True:
            alive = await self._decode_candidates(tried)
            d_id = self.c.cost.choose_decode(alive, self.c.index, hashes)
            try:
                queue = self._start(
                    d_id, rid, context, max_tokens, expect_transfer=bool(hashes), awaits_first=True
                )
            except WorkerLostError:  # its stream went down just now
                tried.append(d_id)
                self.c.metrics.retries_total.labels(reason="stream_down").inc()
                continue
            return d_id, queue

    # ---- prefill ----------------------------------------------------------------------------
    async def _prefill(
        self,
        rid: str,
        placement: Placement,
        context: list[int],
        max_tokens: int,
        d_id: str | None,
        hashes: list[BlockHash],
    ) -> PrefillResult:
        c, req = self.c, self.req
        p_id = placement.worker_id
        p = c.members.get(p_id)
        gone = p.gone
        if gone is None or not p.alive:
            raise _Lost(Role.PREFILL, p_id, "prefill", "down before its prefill started")
        pull_addr = (
            c.members.get(placement.pull_from).info.kv_address if placement.pull_from else None
        )
        if placement.plan.load_s > 0:  # the hint: start moving its blocks up the tiers now
            p.handle.prefetch.remote(hashes)
        self.usage.prefill = p_id
        c.members.add_in_flight(p_id, +1)
        self._prefilling = (p_id, rid)
        self._at(p_id, "prefill")
        t0 = time.monotonic()
        try:
            ref = p.handle.prefill.remote(
                PrefillRequest(
                    req_id=rid,
                    prompt_token_ids=tuple(context),
                    sampling=self._sampling(max_tokens),
                    cache_salt=req.cache_salt,
                    decode_kv_address=c.members.get(d_id).info.kv_address if d_id else None,
                    timeout_s=self._remaining(),
                    pull_from=pull_addr,
                    num_pull_blocks=placement.num_pull_blocks,
                )
            )
            finished, res = await first_of(ray_result(ref), gone, self._remaining())
            if not finished:
                raise _Lost(Role.PREFILL, p_id, "prefill", gone.result())
            assert res is not None
            with c.members.lock:
                profile = c.cost.profiles.get(p_id)
                if profile is not None:
                    profile.observe_service(time.monotonic() - t0)
            return res
        except asyncio.TimeoutError:
            p.handle.abort.remote(rid)
            raise RequestTimeoutError(
                f"prefill of {req.req_id} on {p_id} timed out "
                + self._tag("deadline", Role.PREFILL, "prefill", p_id)
            ) from None
        except asyncio.CancelledError:
            p.handle.abort.remote(rid)  # the client left
            raise
        except RayActorError as e:
            c.members.mark_down(p_id, e)
            raise _Lost(Role.PREFILL, p_id, "prefill", type(e).__name__) from e
        except RayTaskError as e:  # a ValueError etc. raised by the worker itself
            raise e.as_instanceof_cause() from None
        finally:
            self._prefilling = None
            self._at(None, "")
            c.members.add_in_flight(p_id, -1)

    def _took_prefill(self, res: PrefillResult, num_tokens: int) -> None:
        self.usage.took_prefill(res, self.c.block_size)
        if self.lost:  # a moved request: what its new prefill worker computed again
            pulled = res.num_pulled_blocks * self.c.block_size
            self.c.metrics.migration_tokens_recomputed_total.inc(
                max(0, num_tokens - res.cached_tokens - pulled)
            )

    def _sampling(self, max_tokens: int) -> SamplingParams:
        """The request's sampling, for the ``max_tokens`` this placement still generates."""
        return dataclasses.replace(self.req.sampling, max_tokens=max_tokens)

    # ---- decode -----------------------------------------------------------------------------
    def _start(
        self,
        d_id: str,
        rid: str,
        token_ids: list[int],
        max_tokens: int,
        expect_transfer: bool,
        awaits_first: bool = False,
    ) -> TokenQueue:
        """Send the request to decode worker ``d_id`` (a Ray call that returns at once); its
        tokens come to the returned queue. ``WorkerLostError`` if its stream is down;
        ``max_tokens``: tokens to generate (after the first token when ``awaits_first``)."""
        d = self.c.members.get(d_id)
        outputs = d.outputs
        if outputs is None or not d.alive:
            raise WorkerLostError(f"decode worker {d_id} is down")
        queue = outputs.register(rid)
        self.c.members.add_in_flight(d_id, +1)
        self.usage.decode = d_id
        d.handle.start.remote(
            DecodeRequest(
                req_id=rid,
                token_ids=tuple(token_ids),
                sampling=self._sampling(max_tokens),
                cache_salt=self.req.cache_salt,
                expect_transfer=expect_transfer,
                transfer_timeout_s=self.c.config.transfer_timeout_s,
                awaits_first_token=awaits_first,
                num_prompt_tokens=len(self.req.prompt_token_ids),
            )
        )
        return queue

    def _end_decode(self, d_id: str, rid: str, abort: bool) -> None:
        """The request is done with decode worker ``d_id``; ``abort``: it did not finish there
        (cancelled, timed out, moved, or never read): the worker drops it and frees its blocks."""
        d = self.c.members.get(d_id)
        if d.outputs is not None:
            d.outputs.unregister(rid)
        self.c.members.add_in_flight(d_id, -1)
        if abort and d.alive:
            d.handle.abort.remote(rid)

    async def _decode(
        self, d_id: str, rid: str, queue: TokenQueue, context: list[int], recompute: bool = False
    ) -> AsyncIterator[TokenDelta]:
        """The tokens of decode worker ``d_id`` after ``context`` until the request finishes;
        ``recompute``: it computes the context's missing blocks and first token itself."""
        phase = "awaiting_first"
        self._at(d_id, phase)
        done = False
        try:
            while True:
                try:
                    item = await queue.get(self._remaining())
                except WorkerLostError as e:
                    raise _Lost(Role.DECODE, d_id, phase, e) from e
                if phase == "awaiting_first":
                    phase = "decoding"
                    self._at(d_id, phase)
                    self._took_first(item.cached_by_tier, len(context), recompute)
                self.tokens.extend(item.token_ids)
                if item.finish_reason is not None:
                    done = True
                    usage = self.usage.done(len(self.tokens))
                    yield TokenDelta(item.token_ids, item.finish_reason, usage)
                    return
                if item.token_ids:
                    yield TokenDelta(item.token_ids)
        finally:
            self._at(None, "")
            self._end_decode(d_id, rid, abort=not done)

    def _took_first(self, cached: dict[str, int] | None, num_tokens: int, recompute: bool) -> None:
        """The decode worker's first output; ``recompute``: it computed the context, a moved
        request's (its cache hits tell how much it found)."""
        hits = {k: v for k, v in (cached or {}).items() if v}
        self.usage.took_first(hits, self.t0)
        if recompute:
            self.c.metrics.migration_tokens_recomputed_total.inc(
                max(0, num_tokens - sum(hits.values()))
            )
