"""The Ray actor shell of ``DecodeWorker`` (placed by the custom resource ``decode``).

Arguments and results cross the actor boundary as plain dicts, so the router's process never
imports torch or the engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import ray

from decode_worker.worker import DecodeWorker
from engine.config import EngineConfig
from engine.sampling import SamplingParams
from kvstore.config import StoreConfig


class DecodeActor:
    def __init__(
        self,
        worker_id: str,
        engine_config: EngineConfig,
        store_config: StoreConfig,
        secret: str | None = None,
        kv_host: str = "127.0.0.1",
    ) -> None:
        self.worker = DecodeWorker(
            worker_id, engine_config, store_config, secret=secret, kv_host=kv_host
        )

    def info(self) -> dict[str, Any]:
        return dataclasses.asdict(self.worker.info())

    def generate(
        self,
        req_id: str,
        token_ids: list[int],
        sampling: dict[str, Any],
        cache_salt: str,
        expect_transfer: bool,
        transfer_timeout_s: float,
    ) -> Iterator[dict[str, Any]]:
        """A Ray streaming generator: call with ``.options(num_returns="streaming")``."""
        for delta in self.worker.generate(
            req_id,
            token_ids,
            SamplingParams(**sampling),
            cache_salt,
            expect_transfer,
            transfer_timeout_s,
        ):
            yield dataclasses.asdict(delta)

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


def decode_actor_class(**options: Any):  # noqa: ANN201
    return ray.remote(DecodeActor).options(**options)
