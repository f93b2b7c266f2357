"""The Ray actor shell of ``DecodeWorker`` (placed by the custom resource ``decode``)."""

from __future__ import annotations

from typing import Any

import ray

from decode_worker.worker import DecodeWorker
from proto.worker_api import DecodeRequest
from worker.base import WorkerActorBase


class DecodeActor(WorkerActorBase):
    worker_class = DecodeWorker
    worker: DecodeWorker

    def start(self, req: DecodeRequest) -> None:
        """Take a decode request; its tokens come out on the worker's output stream."""
        self.worker.start(req)

    def first_token(self, req_id: str, token: int | None, push_coming: bool = True) -> None:
        self.worker.first_token(req_id, token, push_coming)


def decode_actor_class(**options: Any):
    return ray.remote(DecodeActor).options(**options)
