"""The Ray actor shell of ``DecodeWorker`` (placed by the custom resource ``decode``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import ray

from decode_worker.worker import DecodeWorker
from engine.sampling import SamplingParams
from engine.worker_base import WorkerActorBase


class DecodeActor(WorkerActorBase):
    worker_class = DecodeWorker
    worker: DecodeWorker

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


def decode_actor_class(**options: Any):  # noqa: ANN201
    return ray.remote(DecodeActor).options(**options)
