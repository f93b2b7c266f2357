"""Send timed requests to an in-process engine (``EngineLoop``) or a running service; time them.

Both drivers submit each request at its offset from the start, read its stream on a thread of
its own and record client-side times: TTFT = submit -> first token, TBT = gaps between later
token arrivals. ``concurrency`` bounds the requests in flight (later ones wait for a free slot).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TimedRequest:
    req_id: str
    at_s: float  # submit this long after the start
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass(slots=True)
class RequestRecord:
    req_id: str
    prompt_len: int
    submit_s: float = 0.0  # from the start of the run
    ttft_s: float | None = None  # submit -> first token, client side
    tbt_s: list[float] = field(default_factory=list)  # gaps between later token arrivals
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    cached_by_tier: dict[str, int] = field(default_factory=dict)
    error: str | None = None


def run_requests(
    requests: Sequence[TimedRequest],
    send: Callable[[TimedRequest, RequestRecord, float], None],
    concurrency: int | None = None,
    max_seconds: float | None = None,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Run ``send(req, record, t0)`` for each request at its time; (records, wall seconds)."""
    slots = threading.BoundedSemaphore(concurrency) if concurrency else None
    records: list[RequestRecord] = []
    threads: list[threading.Thread] = []
    t0 = time.perf_counter()

    def worker(req: TimedRequest, rec: RequestRecord) -> None:
        try:
            send(req, rec, t0)
        except Exception as e:  # recorded, reported in the results
            rec.error = f"{type(e).__name__}: {e}"
        finally:
            if slots is not None:
                slots.release()
            if on_done is not None:
                on_done(rec)

    for req in sorted(requests, key=lambda r: r.at_s):
        if max_seconds is not None and req.at_s > max_seconds:
            break
        delay = req.at_s - (time.perf_counter() - t0)
        if delay > 0:
            time.sleep(delay)
        if slots is not None:
            slots.acquire()
        rec = RequestRecord(req.req_id, len(req.prompt_token_ids))
        records.append(rec)
        th = threading.Thread(target=worker, args=(req, rec), daemon=True)
        threads.append(th)
        th.start()
    for th in threads:
        th.join()
    return records, time.perf_counter() - t0


def engine_sender(loop: Any) -> Callable[[TimedRequest, RequestRecord, float], None]:
    """``send`` for an ``engine.loop.EngineLoop``."""
    from engine.sampling import SamplingParams

    def send(req: TimedRequest, rec: RequestRecord, t0: float) -> None:
        sampling = SamplingParams(max_tokens=req.max_tokens, ignore_eos=True)
        start = time.perf_counter()
        rec.submit_s = start - t0
        stream = loop.submit(req.req_id, req.prompt_token_ids, sampling)
        last = start
        for out in stream.iter(timeout=600.0):
            now = time.perf_counter()
            if out.new_token_ids:
                if rec.ttft_s is None:
                    rec.ttft_s = now - start
                else:
                    rec.tbt_s.append(now - last)
                last = now
                rec.num_output_tokens += len(out.new_token_ids)
            rec.num_cached_tokens = out.num_cached_tokens
            rec.cached_by_tier = dict(out.cached_by_tier)

    return send


def client_sender(
    client: Any, cache_salt: str = ""  # a router.client.StrataClient
) -> Callable[[TimedRequest, RequestRecord, float], None]:
    """``send`` for a ``StrataClient`` (one channel, shared by the threads).

    Give each benchmark run its own ``cache_salt`` so it never hits blocks of an earlier run.
    """

    def send(req: TimedRequest, rec: RequestRecord, t0: float) -> None:
        start = time.perf_counter()
        rec.submit_s = start - t0
        last = start
        for chunk in client.stream(prompt_token_ids=req.prompt_token_ids,
                                   max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True,
                                   request_id=req.req_id, cache_salt=cache_salt,
                                   timeout=600.0):
            now = time.perf_counter()
            if chunk.token_ids:
                if rec.ttft_s is None:
                    rec.ttft_s = now - start
                else:
                    rec.tbt_s.append(now - last)
                last = now
                rec.num_output_tokens += len(chunk.token_ids)
            if chunk.usage is not None:
                rec.num_cached_tokens = chunk.usage.cached_tokens
                rec.cached_by_tier = dict(chunk.usage.cached_tokens_by_tier)

    return send


def hit_rates(records: Sequence[RequestRecord]) -> dict[str, float]:
    """Prompt-token hit rate overall and per tier (device, host, disk) over finished requests."""
    done = [r for r in records if r.error is None]
    total = sum(r.prompt_len for r in done)
    out = {"total": sum(r.num_cached_tokens for r in done) / total if total else 0.0}
    for tier in ("device", "host", "disk"):
        hits = sum(r.cached_by_tier.get(tier, 0) for r in done)
        out[tier] = hits / total if total else 0.0
    return out
