"""``RayBackend``: the router's view of the cluster — Ray actor handles of the prefill and decode
workers, their output streams, the global block index fed by their events, and the cost model
that places requests.

Request path: hash the prompt's blocks -> choose the prefill worker with the lowest predicted
TTFT and a decode worker -> prefetch hint -> ``prefill`` (a Ray call; the prefill worker streams
the prompt's blocks to the decode worker while it computes, and returns the first token) ->
``start`` on the decode worker (a Ray call that returns at once) -> the request's tokens arrive
on that worker's output stream (``router.outputs``: one gRPC stream per decode worker, one
message per engine step). Without prefill workers the service is colocated: a decode worker
computes the prompt too, and the first token comes from its stream.

A worker that dies is dropped from the index; a request it was serving is retried on another
worker (recomputing what it must) or fails with UNAVAILABLE. Every wait has a deadline. The
shared state (alive flags, in-flight counts, queue depths, live requests) changes under one lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from kvstore.keys import hash_prompt_blocks
from proto.worker_api import (
    DECODE,
    PREFILL,
    DecodeRequest,
    PrefillRequest,
    PrefillResult,
    SamplingParams,
)
from router.config import BackendConfig
from router.errors import NoWorkerError, RequestTimeoutError
from router.index import GlobalBlockIndex
from router.membership import GONE, Membership
from router.outputs import TokenQueue, Tokens, WorkerLostError
from router.placement import CostModel, Placement
from router.types import FINISH_ABORT, GenRequest, TokenDelta, Usage

logger = logging.getLogger(__name__)

WORKER_DIED = (RayActorError,)
__all__ = ["BackendConfig", "RayBackend"]


@dataclass(slots=True)
class _Live:
    prefill: str | None = None
    decode: str | None = None
    cancelled: bool = False


class _PrefillLost(Exception):
    def __init__(self, prefill: str, decode: str) -> None:
        super().__init__(f"prefill worker {prefill} died")
        self.prefill = prefill
        self.decode = decode


@dataclass(slots=True)
class _Usage:
    prompt_tokens: int
    cached_tokens: int = 0
    by_tier: dict[str, int] = field(default_factory=dict)
    ttft_ms: float = 0.0
    prefill: str = ""
    decode: str = ""

    def done(self, num_tokens: int) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=num_tokens,
            cached_tokens=self.cached_tokens,
            cached_tokens_by_tier=dict(self.by_tier),
            ttft_ms=self.ttft_ms,
            prefill_worker=self.prefill,
            decode_worker=self.decode,
        )


class RayBackend:
    def __init__(
        self,
        workers: list[tuple[str, Any]],
        config: BackendConfig | None = None,
        secret: str | None = None,
    ) -> None:
        """``workers``: (role, actor handle) pairs, role "prefill" or "decode"."""
        self.config = config or BackendConfig()
        if not any(role == DECODE for role, _ in workers):
            raise ValueError("the service needs at least one decode worker")
        first = ray.get(workers[0][1].info.remote(), timeout=600)
        self.fingerprint: bytes = first.fingerprint
        self.block_size: int = first.block_size
        self.vocab_size: int = first.vocab_size
        self.index = GlobalBlockIndex()
        self.cost = CostModel(self.block_size, first.block_nbytes)
        self.members = Membership(self.config, secret, self.index, self.cost)
        self._lock = threading.Lock()  # the live requests
        self._live: dict[str, _Live] = {}
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
            w.role == PREFILL and w.state != GONE for w in self.members.snapshot()
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
        for role in (DECODE,):
            if not any(w.role == role and w.state != GONE for w in left):
                raise ValueError(f"the service needs at least one {role} worker")
        handles = self.members.retire(worker_ids, drain_timeout_s)
        self._scaled()
        return handles

    def _observe_network(self) -> None:
        """Worker-to-worker bandwidth, measured from the pushes so far (0 until one happened:
        then no pull is ever planned)."""
        nbytes = seconds = 0.0
        for w in self.members.snapshot():
            if w.alive and w.role == PREFILL:
                try:
                    s = ray.get(w.handle.stats.remote(), timeout=self.config.call_timeout_s)
                except Exception:  # noqa: BLE001 - measured again next time
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
                except Exception:  # noqa: BLE001 - a slow worker is retried next round
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
        return bool(self._alive(DECODE)) and (self.colocated or bool(self._alive(PREFILL)))

    def stats(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for w in self.members.snapshot():
            if w.state == GONE:
                continue
            if not w.alive:
                out[w.worker_id] = {"alive": 0.0, "restarts": float(w.restarts)}
                continue
            try:
                s = ray.get(w.handle.stats.remote(), timeout=self.config.call_timeout_s)
            except WORKER_DIED as e:
                self._mark_dead(w.worker_id, e)
                out[w.worker_id] = {"alive": 0.0}
                continue
            s = {k: float(v) for k, v in s.items()}
            s["alive"] = 1.0
            s["restarts"] = float(w.restarts)
            with self.members.lock:
                s["in_flight"] = float(w.in_flight)
            s["index_blocks"] = float(self.index.num_blocks(w.worker_id))
            if w.outputs is not None:
                s["output_stream_messages"] = float(w.outputs.num_messages)
            out[w.worker_id] = s
        return out

    def cancel(self, req_id: str) -> None:
        with self._lock:
            live = self._live.get(req_id)
            if live is None:
                return
            live.cancelled = True
            ids = [wid for wid in (live.prefill, live.decode) if wid is not None]
        targets = [w for w in map(self.members.get, ids) if w.alive]
        for w in targets:
            w.handle.abort.remote(req_id)

    def generate(self, req: GenRequest, context_deadline_s: float) -> Iterator[TokenDelta]:
        end = time.monotonic() + context_deadline_s
        live = _Live()
        with self._lock:
            self._live[req.req_id] = live
        try:
            if self.colocated:
                yield from self._generate_colocated(req, live, end)
            else:
                yield from self._generate(req, live, end)
        finally:
            with self._lock:
                self._live.pop(req.req_id, None)

    # ---- one request ---------------------------------------------------------------------
    def _remaining(self, end: float, req_id: str) -> float:
        left = end - time.monotonic()
        if left <= 0:
            raise RequestTimeoutError(f"request {req_id} ran out of time")
        return left

    @staticmethod
    def _sampling(req: GenRequest, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            seed=req.seed,
            stop_token_ids=tuple(req.stop_token_ids),
            ignore_eos=req.ignore_eos,
        )

    def _generate(self, req: GenRequest, live: _Live, end: float) -> Iterator[TokenDelta]:
        prompt = list(req.prompt_token_ids)
        hashes = hash_prompt_blocks(prompt, self.block_size, self.fingerprint, req.cache_salt)
        placement = self.cost.choose_prefill(self._alive(PREFILL), self.index, hashes, len(prompt))
        p_id = placement.worker_id
        d_id = self.cost.choose_decode(self._alive(DECODE), self.index, hashes)
        live.prefill, live.decode = p_id, d_id
        # The decode worker gets the request now, while the prompt is prefilled: it admits it
        # the moment the pushed blocks and the first token (at the push's end) have landed.
        early = None
        if req.max_tokens > 1:
            try:
                early = self._start_decode(
                    req, d_id, prompt, expect_transfer=bool(hashes), awaits_first_token=True
                )
            except WorkerLostError:  # its stream is down: sent later, to a worker that is up
                early = None
        d = self.members.get(d_id)
        handed = False  # whether `early` went to the reader, whose clean-up then owns it
        try:
            try:
                res = self._prefill(req, prompt, hashes, placement, d_id, end)
            except _PrefillLost:
                # The decode worker holds whatever blocks were pushed before the prefill worker
                # died: it computes the rest (first token included) and goes on decoding.
                logger.warning(
                    "prefill worker %s died serving %s; %s computes what is missing",
                    p_id,
                    req.req_id,
                    d_id,
                )
                if early is not None:
                    d.handle.first_token.remote(req.req_id, None, False)
                usage = _Usage(len(prompt), prefill=p_id, decode=d_id)
                handed = True
                yield from self._decode_with_retries(req, prompt, [], d_id, live, end, usage, early)
                return
            tokens = [res.first_token]
            usage = _Usage(
                len(prompt), res.cached_tokens, dict(res.cached_by_tier), res.prefill_ms, p_id, d_id
            )
            if res.num_pulled_blocks:
                usage.by_tier["remote"] = res.num_pulled_blocks * self.block_size
            if res.finished:
                yield TokenDelta(tuple(tokens), res.finish_reason, usage.done(len(tokens)))
                return
            if early is not None:  # the push carries it too; this covers a push that broke
                d.handle.first_token.remote(req.req_id, res.first_token, res.num_blocks_to_push > 0)
            yield TokenDelta(tuple(tokens))
            handed = True
            yield from self._decode_with_retries(req, prompt, tokens, d_id, live, end, usage, early)
        finally:
            if early is not None and not handed:  # it will not decode after all
                self._end_decode(req.req_id, d_id, abort=True)

    def _generate_colocated(self, req: GenRequest, live: _Live, end: float) -> Iterator[TokenDelta]:
        """No prefill workers: the decode worker holding most of the prefix computes the prompt
        and decodes; the first token comes from its output stream like every other."""
        prompt = list(req.prompt_token_ids)
        hashes = hash_prompt_blocks(prompt, self.block_size, self.fingerprint, req.cache_salt)
        placement = self.cost.choose_prefill(self._alive(DECODE), self.index, hashes, len(prompt))
        d_id = placement.worker_id
        if placement.plan.load_s > 0:  # blocks below its device pool: start moving them up
            self.members.get(d_id).handle.prefetch.remote(hashes)
        usage = _Usage(len(prompt), decode=d_id)
        yield from self._decode_with_retries(req, prompt, [], d_id, live, end, usage)

    def _decode_with_retries(
        self,
        req: GenRequest,
        prompt: list[int],
        tokens: list[int],
        d_id: str,
        live: _Live,
        end: float,
        usage: _Usage,
        started: TokenQueue | None = None,
    ) -> Iterator[TokenDelta]:
        """The decode worker's tokens after ``tokens``; ``started``: the request was sent to
        ``d_id`` already (this is its queue), else it is sent now. A decode worker lost on the
        way: the request moves to another one, which recomputes its KV."""
        t0 = time.monotonic()
        queue = started
        for attempt in range(self.config.max_retries + 1):
            live.decode = usage.decode = d_id
            try:
                if queue is None:
                    queue = self._start_decode(req, d_id, prompt + tokens, False, False)
                for item in self._read_decode(req, d_id, queue, end):
                    if item.cached_by_tier is not None and not usage.ttft_ms:  # its first token
                        usage.by_tier = {k: v for k, v in item.cached_by_tier.items() if v}
                        usage.cached_tokens = sum(usage.by_tier.values())
                        usage.ttft_ms = (time.monotonic() - t0) * 1e3
                    tokens.extend(item.token_ids)
                    if item.finish_reason is not None:
                        yield TokenDelta(
                            item.token_ids, item.finish_reason, usage.done(len(tokens))
                        )
                        return
                    if item.token_ids:
                        yield TokenDelta(item.token_ids)
                raise NoWorkerError(f"decode worker {d_id} ended {req.req_id} without finishing")
            except WorkerLostError as e:
                queue = None
                self.members.on_stream_broken(d_id, e)
                if live.cancelled:
                    yield TokenDelta((), FINISH_ABORT, usage.done(len(tokens)))
                    return
                if attempt == self.config.max_retries:
                    raise NoWorkerError(f"decode worker {d_id} lost serving {req.req_id}") from e
                others = [w for w in self._alive(DECODE) if w != d_id] or self._alive(DECODE)
                d_id = self.cost.choose_decode(others, self.index, [])
                logger.warning("retrying %s on %s after %d tokens", req.req_id, d_id, len(tokens))

    def _prefill(
        self,
        req: GenRequest,
        prompt: list[int],
        hashes: list,
        placement: Placement,
        d_id: str,
        end: float,
    ) -> PrefillResult:
        p_id = placement.worker_id
        p, d = self.members.get(p_id), self.members.get(d_id)
        pull_addr = (
            self.members.get(placement.pull_from).info.kv_address if placement.pull_from else None
        )
        if placement.plan.load_s > 0:  # the hint: start moving its blocks up the tiers now
            p.handle.prefetch.remote(hashes)
        self.members.add_in_flight(p_id, +1)
        t0 = time.monotonic()
        try:
            ref = p.handle.prefill.remote(
                PrefillRequest(
                    req_id=req.req_id,
                    prompt_token_ids=tuple(prompt),
                    sampling=self._sampling(req, req.max_tokens),
                    cache_salt=req.cache_salt,
                    decode_kv_address=d.info.kv_address,
                    timeout_s=self._remaining(end, req.req_id),
                    pull_from=pull_addr,
                    num_pull_blocks=placement.num_pull_blocks,
                )
            )
            res: PrefillResult = ray.get(ref, timeout=self._remaining(end, req.req_id))
            with self.members.lock:
                profile = self.cost.profiles.get(p_id)
                if profile is not None:
                    profile.observe_service(time.monotonic() - t0)
            return res
        except GetTimeoutError:
            p.handle.abort.remote(req.req_id)
            raise RequestTimeoutError(f"prefill of {req.req_id} on {p_id} timed out") from None
        except WORKER_DIED as e:
            self._mark_dead(p_id, e)
            raise _PrefillLost(p_id, d_id) from e
        except RayTaskError as e:  # a ValueError etc. raised by the worker itself
            raise e.as_instanceof_cause() from None
        finally:
            self.members.add_in_flight(p_id, -1)

    def _start_decode(
        self,
        req: GenRequest,
        d_id: str,
        token_ids: list[int],
        expect_transfer: bool,
        awaits_first_token: bool,
    ) -> TokenQueue:
        """Send the request to decode worker ``d_id`` (a Ray call that returns at once); its
        tokens will come to the returned queue. ``WorkerLostError`` if the worker is gone."""
        d = self.members.get(d_id)
        outputs = d.outputs
        if outputs is None or not d.alive:
            raise WorkerLostError(f"decode worker {d_id} is gone")
        generated = len(token_ids) - len(req.prompt_token_ids)
        remaining = req.max_tokens - generated - (1 if awaits_first_token else 0)
        queue = outputs.register(req.req_id)
        self.members.add_in_flight(d_id, +1)
        d.handle.start.remote(
            DecodeRequest(
                req_id=req.req_id,
                token_ids=tuple(token_ids),
                sampling=self._sampling(req, remaining),
                cache_salt=req.cache_salt,
                expect_transfer=expect_transfer,
                transfer_timeout_s=self.config.transfer_timeout_s,
                awaits_first_token=awaits_first_token,
                num_prompt_tokens=len(req.prompt_token_ids),
            )
        )
        return queue

    def _end_decode(self, req_id: str, d_id: str, abort: bool) -> None:
        """The request is done with decode worker ``d_id``; ``abort``: it did not finish there
        (cancelled, timed out, failed, or never read): the worker drops it and frees its blocks."""
        d = self.members.get(d_id)
        if d.outputs is not None:
            d.outputs.unregister(req_id)
        self.members.add_in_flight(d_id, -1)
        if abort and d.alive:
            d.handle.abort.remote(req_id)

    def _read_decode(
        self, req: GenRequest, d_id: str, queue: TokenQueue, end: float
    ) -> Iterator[Tokens]:
        """The request's tokens from its decode worker until it finishes; if it does not (a
        cancel, a deadline, a failure), the worker is told to drop it."""
        done = False
        try:
            while True:
                item = queue.get(timeout=self._remaining(end, req.req_id))
                done = item.finish_reason is not None
                yield item
                if done:
                    return
        finally:
            self._end_decode(req.req_id, d_id, abort=not done)

    def close(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            self._poller.join(timeout=5)
        self.members.close()
