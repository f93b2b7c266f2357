"""The Ray actor shell of ``PrefillWorker`` (placed by the custom resource ``prefill``).

Arguments and results cross the actor boundary as plain dicts, so the router's process never
imports torch or the engine.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ray

from engine.config import EngineConfig
from engine.sampling import SamplingParams
from kvstore.config import StoreConfig
from prefill_worker.worker import PrefillWorker


class PrefillActor:
    def __init__(
        self,
        worker_id: str,
        engine_config: EngineConfig,
        store_config: StoreConfig,
        secret: str | None = None,
        kv_host: str = "127.0.0.1",
    ) -> None:
        self.worker = PrefillWorker(
            worker_id, engine_config, store_config, secret=secret, kv_host=kv_host
        )

    def info(self) -> dict[str, Any]:
        return dataclasses.asdict(self.worker.info())

    def prefill(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        sampling: dict[str, Any],
        cache_salt: str,
        decode_kv_address: str | None,
        timeout_s: float,
        pull_from: str | None = None,
        num_pull_blocks: int = 0,
    ) -> dict[str, Any]:
        res = self.worker.prefill(
            req_id,
            prompt_token_ids,
            SamplingParams(**sampling),
            cache_salt,
            decode_kv_address,
            timeout_s,
            pull_from,
            num_pull_blocks,
        )
        return dataclasses.asdict(res)

    def prefetch(self, hashes: list[bytes]) -> None:
        self.worker.prefetch(hashes)

    def abort(self, req_id: str) -> None:
        self.worker.abort(req_id)

    def stats(self) -> dict[str, float]:
        return self.worker.stats()

    def drain_events(self) -> list[tuple[str, str, list[bytes]]]:
        return self.worker.drain_events()

    def evict_cached(self, down_to: str = "host") -> dict[str, int]:
        return self.worker.evict_cached(down_to)

    def check_no_leaks(self) -> bool:
        return self.worker.check_no_leaks()

    def shutdown(self) -> None:
        self.worker.shutdown()


def prefill_actor_class(**options: Any):  # noqa: ANN201
    return ray.remote(PrefillActor).options(**options)
