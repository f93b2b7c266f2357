"""The Ray actor shell of ``PrefillWorker`` (placed by the custom resource ``prefill``)."""

from __future__ import annotations

from typing import Any

import ray

from prefill_worker.worker import PrefillWorker
from proto.worker_api import PrefillRequest, PrefillResult
from worker.base import WorkerActorBase


class PrefillActor(WorkerActorBase):
    worker_class = PrefillWorker
    worker: PrefillWorker

    def prefill(self, req: PrefillRequest) -> PrefillResult:
        return self.worker.prefill(req)


def prefill_actor_class(**options: Any):
    return ray.remote(PrefillActor).options(**options)
