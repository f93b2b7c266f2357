"""``DecodeWorker``: receives a request's KV blocks over gRPC, admits the request once they are in
place, and decodes it in a continuous batch, streaming tokens back.

If the transfer fails or does not arrive in time, the request is still served: the engine
computes whatever KV it does not hold (correct output, slower), never hangs.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.sampling import SamplingParams
from engine.worker_base import WorkerBase
from kvstore.config import StoreConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeDelta:
    token_ids: tuple[int, ...]
    finish_reason: str | None  # set on the last delta
    cached_tokens: int  # of the sequence handed over (prompt + first token)
    cached_by_tier: dict[str, int]
    transfer_ms: float  # waiting for the prefill worker's blocks (0 if none expected)


class DecodeWorker(WorkerBase):
    role = "decode"

    def __init__(
        self,
        worker_id: str,
        engine_config: EngineConfig,
        store_config: StoreConfig,
        secret: str | None = None,
        kv_host: str = "127.0.0.1",
        kv_port: int = 0,
    ) -> None:
        super().__init__(worker_id, engine_config, store_config, secret, kv_host, kv_port)
        self._transfers: dict[str, tuple[threading.Event, list[bool]]] = {}
        self._aborted: set[str] = set()
        self._lock = threading.Lock()
        self.transfer_stats = {
            "transfers_ok": 0.0,
            "transfers_failed": 0.0,
            "transfers_timed_out": 0.0,
        }

    def _transfer_slot(self, req_id: str) -> tuple[threading.Event, list[bool]]:
        with self._lock:
            slot = self._transfers.get(req_id)
            if slot is None:
                slot = self._transfers[req_id] = (threading.Event(), [False])
            return slot

    def on_transfer_done(self, req_id: str, ok: bool) -> None:
        event, result = self._transfer_slot(req_id)
        result[0] = ok
        event.set()

    def generate(
        self,
        req_id: str,
        token_ids: list[int],
        sampling: SamplingParams,
        cache_salt: str = "",
        expect_transfer: bool = True,
        transfer_timeout_s: float = 30.0,
        step_timeout_s: float = 120.0,
    ) -> Iterator[DecodeDelta]:
        """Decode ``sampling.max_tokens`` tokens after ``token_ids`` (prompt + first token)."""
        t0 = time.perf_counter()
        if expect_transfer:
            event, result = self._transfer_slot(req_id)
            arrived = event.wait(transfer_timeout_s)
            key = (
                "transfers_ok"
                if arrived and result[0]
                else ("transfers_failed" if arrived else "transfers_timed_out")
            )
            self.transfer_stats[key] += 1
        with self._lock:
            self._transfers.pop(req_id, None)
            if req_id in self._aborted:
                self._aborted.discard(req_id)
                yield DecodeDelta((), "abort", 0, {}, 0.0)
                return
        transfer_ms = (time.perf_counter() - t0) * 1000.0
        stream = self.loop.submit(req_id, list(token_ids), sampling, cache_salt)
        try:
            for out in stream.iter_merged(timeout=step_timeout_s):
                yield DecodeDelta(
                    out.new_token_ids,
                    out.finish_reason,
                    out.num_cached_tokens,
                    out.cached_by_tier,
                    transfer_ms,
                )
        except queue.Empty:
            self.loop.abort(req_id)
            raise TimeoutError(f"decode of {req_id}: no token for {step_timeout_s:.0f} s") from None
        except GeneratorExit:  # the consumer went away (cancelled): free the blocks
            self.loop.abort(req_id)
            raise

    def abort(self, req_id: str) -> None:
        super().abort(req_id)
        with self._lock:
            slot = self._transfers.get(req_id)
            if slot is not None:  # still waiting for its blocks: wake it, it will not decode
                self._aborted.add(req_id)
                slot[0].set()

    def stats(self) -> dict[str, float]:
        return {**super().stats(), **self.transfer_stats}


def continuation(sampling: SamplingParams) -> SamplingParams:
    """Sampling of the decode part: one token fewer (the prefill worker sampled the first)."""
    return dataclasses.replace(sampling, max_tokens=sampling.max_tokens - 1)
