"""The Ray actor shell of ``PrefillWorker`` (placed by the custom resource ``prefill``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import ray

from engine.sampling import SamplingParams
from engine.worker_base import WorkerActorBase
from prefill_worker.worker import PrefillWorker


class PrefillActor(WorkerActorBase):
    worker_class = PrefillWorker
    worker: PrefillWorker

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


def prefill_actor_class(**options: Any):  # noqa: ANN201
    return ray.remote(PrefillActor).options(**options)
