"""``PrefillWorker``: computes a prompt's missing KV, samples the first token, and pushes the
request's blocks to the chosen decode worker over gRPC (in the background, so the first token
goes back to the router without waiting for the transfer)."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.sampling import SamplingParams
from engine.worker_base import WorkerBase
from kvstore.config import StoreConfig
from kvstore.errors import StrataError
from prefill_worker.kv_sender import KVSender

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillResult:
    req_id: str
    first_token: int
    finished: bool  # the request ends here (stop token or max_tokens == 1)
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int
    cached_by_tier: dict[str, int]
    prefill_ms: float  # arrival at this worker to first token
    num_blocks_to_push: int  # full blocks the decode worker is sent (or already holds)
    num_pulled_blocks: int = 0  # blocks fetched from another worker before computing


class PrefillWorker(WorkerBase):
    role = "prefill"

    def __init__(
        self,
        worker_id: str,
        engine_config: EngineConfig,
        store_config: StoreConfig,
        secret: str | None = None,
        transfer_deadline_s: float = 60.0,
        kv_host: str = "127.0.0.1",
        kv_port: int = 0,
    ) -> None:
        super().__init__(worker_id, engine_config, store_config, secret, kv_host, kv_port)
        self.sender = KVSender(secret=secret)
        self.transfer_deadline_s = transfer_deadline_s
        self._pushes = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"{worker_id}-push")
        self._cancels: dict[str, threading.Event] = {}
        self.push_stats = {
            "push_blocks": 0.0,
            "push_bytes": 0.0,
            "push_seconds": 0.0,
            "push_failures": 0.0,
            "pull_blocks": 0.0,
        }

    def prefill(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        cache_salt: str = "",
        decode_kv_address: str | None = None,
        timeout_s: float = 300.0,
        pull_from: str | None = None,
        num_pull_blocks: int = 0,
    ) -> PrefillResult:
        t0 = time.perf_counter()
        num_pulled = 0
        if pull_from and num_pull_blocks > 0:
            num_pulled = self._pull(pull_from, prompt_token_ids, cache_salt, num_pull_blocks)
        first = dataclasses.replace(sampling, max_tokens=1)
        stream = self.loop.submit(req_id, list(prompt_token_ids), first, cache_salt)
        try:
            out = stream.get(timeout=timeout_s)
        except queue.Empty:
            self.loop.abort(req_id)
            raise TimeoutError(f"prefill of {req_id} took longer than {timeout_s:.0f} s") from None
        token = out.new_token_ids[0]
        stop = out.finish_reason == "stop"
        finished = stop or sampling.max_tokens == 1
        hashes = self.engine.block_hashes(prompt_token_ids, cache_salt)
        if decode_kv_address and not finished and hashes:
            cancel = threading.Event()
            self._cancels[req_id] = cancel
            self._pushes.submit(self._push, req_id, hashes, decode_kv_address, cancel)
        return PrefillResult(
            req_id=req_id,
            first_token=token,
            finished=finished,
            finish_reason=("stop" if stop else "length") if finished else None,
            prompt_tokens=len(prompt_token_ids),
            cached_tokens=out.num_cached_tokens,
            cached_by_tier=out.cached_by_tier,
            prefill_ms=(time.perf_counter() - t0) * 1000.0,
            num_blocks_to_push=len(hashes) if decode_kv_address and not finished else 0,
            num_pulled_blocks=num_pulled,
        )

    def _pull(self, address: str, prompt: list[int], cache_salt: str, num_blocks: int) -> int:
        """Fetch up to ``num_blocks`` leading prompt blocks this worker lacks from another one."""
        hashes = self.engine.block_hashes(prompt, cache_salt)[:num_blocks]
        held = self.loop.call(lambda eng: eng.has_blocks(hashes))
        todo = [h for h, ok in zip(hashes, held) if not ok]
        if not todo:
            return 0
        try:
            payloads = self.sender.pull(
                address, self.engine.fingerprint, todo, self.transfer_deadline_s
            )
        except (StrataError, TimeoutError) as e:
            logger.warning("pull from %s failed, recomputing: %s", address, e)
            return 0
        got = [(h, p) for h, p in zip(todo, payloads) if p is not None]
        if not got:
            return 0
        data = torch.stack([torch.frombuffer(bytearray(p), dtype=torch.uint8) for _, p in got])
        self.loop.call(lambda eng: eng.write_blocks([h for h, _ in got], data))
        self.push_stats["pull_blocks"] += len(got)
        return len(got)

    def _push(
        self, req_id: str, hashes: list[bytes], address: str, cancel: threading.Event
    ) -> None:
        try:
            n, data = self.loop.call(lambda eng: eng.read_blocks(hashes))
            payloads = [data[i].numpy().data for i in range(n)]
            res = self.sender.push(
                address,
                req_id,
                self.engine.fingerprint,
                hashes[:n],
                payloads,
                deadline_s=self.transfer_deadline_s,
                cancel=cancel,
            )
            self.push_stats["push_blocks"] += res.num_sent
            self.push_stats["push_bytes"] += res.nbytes
            self.push_stats["push_seconds"] += res.seconds
        except (StrataError, TimeoutError, RuntimeError) as e:
            self.push_stats["push_failures"] += 1
            logger.warning("push of %s to %s failed: %s", req_id, address, e)
        finally:
            self._cancels.pop(req_id, None)

    def abort(self, req_id: str) -> None:
        super().abort(req_id)
        cancel = self._cancels.get(req_id)
        if cancel is not None:
            cancel.set()

    def stats(self) -> dict[str, float]:
        return {**super().stats(), **self.push_stats}

    def shutdown(self) -> None:
        self._pushes.shutdown(wait=False, cancel_futures=True)
        self.sender.close()
        super().shutdown()
