"""``RayBackend``: the router's view of the cluster — Ray actor handles of the prefill and decode
workers, the global block index fed by their events, and the cost model that places requests.

Request path: hash the prompt's blocks -> choose the prefill worker with the lowest predicted
TTFT and a decode worker -> prefetch hint -> ``prefill`` (the first token comes back; the
worker pushes the blocks to the decode worker over gRPC in the background) -> the decode
worker's token stream (a Ray streaming generator). A worker that dies is dropped from the index;
a request it was serving is retried on another worker (recomputing what it must) or fails
with UNAVAILABLE. Every wait has a deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from kvstore.keys import hash_prompt_blocks
from router.errors import NoWorkerError, RequestTimeoutError
from router.index import BlockEvent, GlobalBlockIndex
from router.placement import CostModel, WorkerProfile
from router.types import FINISH_ABORT, GenRequest, TokenDelta, Usage

logger = logging.getLogger(__name__)

WORKER_DIED = (RayActorError,)


@dataclass(frozen=True)
class BackendConfig:
    event_poll_s: float = 0.2  # how often worker events are pulled into the index
    transfer_timeout_s: float = 30.0  # decode worker's wait for pushed blocks, then recompute
    max_retries: int = 1  # times a request moves to another worker after one dies
    call_timeout_s: float = 10.0  # control calls (stats, prefetch, abort)


@dataclass(slots=True)
class _Worker:
    worker_id: str
    role: str
    handle: Any  # Ray actor handle
    info: dict[str, Any]
    alive: bool = True
    in_flight: int = 0


@dataclass(slots=True)
class _Live:
    prefill: str | None = None
    decode: str | None = None
    cancelled: bool = False


class RayBackend:
    def __init__(self, workers: list[tuple[str, Any]], config: BackendConfig | None = None) -> None:
        """``workers``: (role, actor handle) pairs, role "prefill" or "decode"."""
        self.config = config or BackendConfig()
        infos = ray.get([h.info.remote() for _, h in workers], timeout=300)
        self.workers: dict[str, _Worker] = {}
        for (role, handle), info in zip(workers, infos):
            self.workers[info["worker_id"]] = _Worker(info["worker_id"], role, handle, info)
        first = infos[0]
        for info in infos:
            if info["fingerprint"] != first["fingerprint"]:
                raise ValueError(
                    f"workers serve different models: {info['worker_id']} differs from "
                    f"{first['worker_id']} (fingerprints must match)"
                )
        self.fingerprint: bytes = first["fingerprint"]
        self.block_size: int = first["block_size"]
        self.max_model_len: int = min(i["max_model_len"] for i in infos)
        self.vocab_size: int = first["vocab_size"]
        self.index = GlobalBlockIndex()
        self.cost = CostModel(self.block_size, first["block_nbytes"])
        for w in self.workers.values():
            self.index.add_worker(w.worker_id)
            self.cost.update(
                WorkerProfile(
                    w.worker_id,
                    w.info["prefill_tokens_per_s"],
                    load_bytes_per_s={k: v for k, v in w.info["tier_bytes_per_s"].items() if v > 0},
                )
            )
        self._lock = threading.Lock()
        self._live: dict[str, _Live] = {}
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_events, name="event-poller", daemon=True)
        self._poller.start()

    # ---- membership ----------------------------------------------------------------------
    def _alive(self, role: str) -> list[str]:
        return [w.worker_id for w in self.workers.values() if w.role == role and w.alive]

    def _mark_dead(self, worker_id: str, why: object) -> None:
        w = self.workers[worker_id]
        if w.alive:
            logger.warning("worker %s is gone (%s); dropping it from the index", worker_id, why)
            w.alive = False
            self.index.remove_worker(worker_id)
            self.cost.remove(worker_id)

    def _observe_network(self) -> None:
        """Worker-to-worker bandwidth, measured from the pushes so far (0 until one happened:
        then no pull is ever planned)."""
        nbytes = seconds = 0.0
        for w in self.workers.values():
            if w.alive and w.role == "prefill":
                try:
                    s = ray.get(w.handle.stats.remote(), timeout=self.config.call_timeout_s)
                except Exception:  # noqa: BLE001 - measured again next time
                    continue
                nbytes += s.get("push_bytes", 0.0)
                seconds += s.get("push_seconds", 0.0)
        if nbytes > 0 and seconds > 0:
            for profile in self.cost.profiles.values():
                profile.net_bytes_per_s = nbytes / seconds

    def _poll_events(self) -> None:
        rounds = 0
        while not self._stop.wait(self.config.event_poll_s):
            rounds += 1
            if rounds % 25 == 0:
                self._observe_network()
            for w in list(self.workers.values()):
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
                self.index.apply_many(
                    w.worker_id, (BlockEvent(kind, tier, tuple(hs)) for kind, tier, hs in events)
                )

    def sync_index(self) -> None:
        """Pull every worker's pending events now (tests and benchmarks use it)."""
        for w in self.workers.values():
            if w.alive:
                events = ray.get(w.handle.drain_events.remote(), timeout=self.config.call_timeout_s)
                self.index.apply_many(
                    w.worker_id, (BlockEvent(kind, tier, tuple(hs)) for kind, tier, hs in events)
                )

    # ---- the Backend protocol ------------------------------------------------------------
    def healthy(self) -> bool:
        return bool(self._alive("prefill")) and bool(self._alive("decode"))

    def stats(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for w in self.workers.values():
            if not w.alive:
                out[w.worker_id] = {"alive": 0.0}
                continue
            try:
                s = ray.get(w.handle.stats.remote(), timeout=self.config.call_timeout_s)
            except WORKER_DIED as e:
                self._mark_dead(w.worker_id, e)
                out[w.worker_id] = {"alive": 0.0}
                continue
            s = {k: float(v) for k, v in s.items()}
            s["alive"] = 1.0
            s["in_flight"] = float(w.in_flight)
            s["index_blocks"] = float(self.index.num_blocks(w.worker_id))
            out[w.worker_id] = s
        return out

    def cancel(self, req_id: str) -> None:
        with self._lock:
            live = self._live.get(req_id)
            if live is None:
                return
            live.cancelled = True
        for wid in (live.prefill, live.decode):
            if wid is not None and self.workers[wid].alive:
                self.workers[wid].handle.abort.remote(req_id)

    def generate(self, req: GenRequest, context_deadline_s: float) -> Iterator[TokenDelta]:
        end = time.monotonic() + context_deadline_s
        live = _Live()
        with self._lock:
            self._live[req.req_id] = live
        try:
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

    def _sampling(self, req: GenRequest, max_tokens: int) -> dict[str, Any]:
        return {
            "max_tokens": max_tokens,
            "temperature": req.temperature,
            "top_k": req.top_k,
            "top_p": req.top_p,
            "seed": req.seed,
            "stop_token_ids": tuple(req.stop_token_ids),
            "ignore_eos": req.ignore_eos,
        }

    def _generate(self, req: GenRequest, live: _Live, end: float) -> Iterator[TokenDelta]:
        prompt = list(req.prompt_token_ids)
        hashes = hash_prompt_blocks(prompt, self.block_size, self.fingerprint, req.cache_salt)
        res, p_id, d_id = self._prefill(req, prompt, hashes, live, end)
        tokens = [res["first_token"]]
        usage = {
            "prompt_tokens": len(prompt),
            "cached_tokens": res["cached_tokens"],
            "by_tier": dict(res["cached_by_tier"]),
            "ttft_ms": res["prefill_ms"],
            "prefill": p_id,
            "decode": d_id,
        }
        if res["num_pulled_blocks"]:
            usage["by_tier"]["remote"] = res["num_pulled_blocks"] * self.block_size
        if res["finished"]:
            yield TokenDelta(tuple(tokens), res["finish_reason"], self._usage(usage, tokens))
            return
        yield TokenDelta(tuple(tokens))
        expect_transfer = res["num_blocks_to_push"] > 0  # else nothing will arrive
        for attempt in range(self.config.max_retries + 1):
            try:
                for delta in self._decode(
                    req,
                    prompt + tokens,
                    d_id,
                    expect_transfer,
                    live,
                    end,
                    req.max_tokens - len(tokens),
                ):
                    tokens.extend(delta["token_ids"])
                    if delta["finish_reason"] is not None:
                        yield TokenDelta(
                            tuple(delta["token_ids"]),
                            delta["finish_reason"],
                            self._usage(usage, tokens),
                        )
                        return
                    if delta["token_ids"]:
                        yield TokenDelta(tuple(delta["token_ids"]))
                raise NoWorkerError(f"decode worker {d_id} ended {req.req_id} without finishing")
            except WORKER_DIED as e:
                self._mark_dead(d_id, e)
                if live.cancelled:
                    yield TokenDelta((), FINISH_ABORT, self._usage(usage, tokens))
                    return
                if attempt == self.config.max_retries:
                    raise NoWorkerError(f"decode worker {d_id} died serving {req.req_id}") from e
                d_id = self.cost.choose_decode(self._alive("decode"), self.index, [])
                usage["decode"] = d_id
                expect_transfer = False  # the new worker recomputes what it lacks
                logger.warning("retrying %s on %s after %d tokens", req.req_id, d_id, len(tokens))

    def _prefill(self, req: GenRequest, prompt: list[int], hashes: list, live: _Live, end: float):  # noqa: ANN001, ANN202
        for attempt in range(self.config.max_retries + 1):
            placement = self.cost.choose_prefill(
                self._alive("prefill"), self.index, hashes, len(prompt)
            )
            p_id = placement.worker_id
            d_id = self.cost.choose_decode(self._alive("decode"), self.index, hashes)
            live.prefill, live.decode = p_id, d_id
            p, d = self.workers[p_id], self.workers[d_id]
            pull_addr = (
                self.workers[placement.pull_from].info["kv_address"]
                if placement.pull_from
                else None
            )
            if hashes:
                p.handle.prefetch.remote(hashes)  # the hint: start moving blocks up now
            p.in_flight += 1
            self.cost.profiles[p_id].queue_depth = p.in_flight
            t0 = time.monotonic()
            try:
                ref = p.handle.prefill.remote(
                    req.req_id,
                    prompt,
                    self._sampling(req, req.max_tokens),
                    req.cache_salt,
                    d.info["kv_address"],
                    self._remaining(end, req.req_id),
                    pull_addr,
                    placement.num_pull_blocks,
                )
                res = ray.get(ref, timeout=self._remaining(end, req.req_id))
                profile = self.cost.profiles.get(p_id)
                if profile is not None:
                    profile.observe_service(time.monotonic() - t0)
                return res, p_id, d_id
            except GetTimeoutError:
                p.handle.abort.remote(req.req_id)
                raise RequestTimeoutError(f"prefill of {req.req_id} on {p_id} timed out") from None
            except WORKER_DIED as e:
                self._mark_dead(p_id, e)
                if attempt == self.config.max_retries:
                    raise NoWorkerError(f"prefill worker {p_id} died serving {req.req_id}") from e
                logger.warning("retrying prefill of %s after %s died", req.req_id, p_id)
            except RayTaskError as e:  # a ValueError etc. raised by the worker itself
                cause = e.as_instanceof_cause()
                raise cause from None
            finally:
                p.in_flight -= 1
                if p_id in self.cost.profiles:
                    self.cost.profiles[p_id].queue_depth = p.in_flight
        raise NoWorkerError("no prefill worker available")

    def _decode(
        self,
        req: GenRequest,
        token_ids: list[int],
        d_id: str,
        expect_transfer: bool,
        live: _Live,
        end: float,
        max_tokens: int,
    ) -> Iterator[dict[str, Any]]:
        d = self.workers[d_id]
        d.in_flight += 1
        self.cost.profiles[d_id].queue_depth = d.in_flight
        gen = d.handle.generate.options(num_returns="streaming").remote(
            req.req_id,
            token_ids,
            self._sampling(req, max_tokens),
            req.cache_salt,
            expect_transfer,
            self.config.transfer_timeout_s,
        )
        done = False
        try:
            while True:
                ready, _ = ray.wait([gen], timeout=self._remaining(end, req.req_id))
                if not ready:
                    raise RequestTimeoutError(f"decode of {req.req_id} on {d_id} timed out")
                try:
                    ref = next(gen)
                except StopIteration:
                    done = True
                    return
                try:
                    delta = ray.get(ref, timeout=self._remaining(end, req.req_id))
                except RayTaskError as e:
                    raise e.as_instanceof_cause() from None
                done = delta["finish_reason"] is not None
                yield delta
        finally:
            d.in_flight -= 1
            if d_id in self.cost.profiles:
                self.cost.profiles[d_id].queue_depth = d.in_flight
            if not done and d.alive:  # cancelled, timed out or failed: free its blocks there
                d.handle.abort.remote(req.req_id)

    def _usage(self, u: dict[str, Any], tokens: list[int]) -> Usage:
        return Usage(
            prompt_tokens=u["prompt_tokens"],
            completion_tokens=len(tokens),
            cached_tokens=u["cached_tokens"],
            cached_tokens_by_tier=u["by_tier"],
            ttft_ms=u["ttft_ms"],
            prefill_worker=u["prefill"],
            decode_worker=u["decode"],
        )

    def close(self) -> None:
        self._stop.set()
        self._poller.join(timeout=5)
