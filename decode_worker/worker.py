"""``DecodeWorker``: receives a request's KV blocks while its prefill runs, admits the request
once they are in place, and decodes it in a continuous batch. Its tokens go to the router on the
worker's output stream (``OutputSender``: a child process serves it on its own port,
``WorkerInfo.outputs_address``): one message per engine step, every sequence in it.

If the push fails or does not finish within the request's transfer timeout, the request is
still served: the engine computes whatever KV it does not hold (correct output, slower), and a
stalled push stream is cancelled on both sides. Nothing waits forever.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

from grpc_health.v1 import health_pb2

from decode_worker.admission import Admissions
from decode_worker.outputs import OutputSender
from engine.loop import OutputSink, RequestAborted
from proto.vocab import Role
from proto.worker_api import DecodeRequest, SamplingParams, WorkerInfo
from worker.base import WorkerBase
from worker.spec import WorkerSpec

logger = logging.getLogger(__name__)


class DecodeWorker(WorkerBase):
    role = Role.DECODE

    def __init__(self, spec: WorkerSpec) -> None:
        # before the base class: it wires the loop to it
        self.outputs = OutputSender(spec.kv_host, spec.secret, on_lost=self._outputs_lost)
        self.outputs_address = f"{spec.advertise_host or spec.kv_host}:{self.outputs.port}"
        self._stats_lock = threading.Lock()
        self.transfer_stats = {
            "transfers_ok": 0.0,
            "transfers_failed": 0.0,
            "transfers_timed_out": 0.0,
            "transfer_wait_seconds": 0.0,  # requests' waits for their pushes, summed
        }
        try:
            super().__init__(spec)
        except BaseException:
            self.outputs.close()
            raise
        self.admissions = Admissions(self._admit, self._aborted_while_waiting)

    def _outputs(self) -> OutputSink:
        return self.outputs.publish

    def _outputs_lost(self, reason: str) -> None:
        """The output stream's process died: nobody hears this worker's tokens, so it stops
        serving (the router's health stream sees it and moves its requests elsewhere)."""
        logger.error("%s: output stream lost (%s); not serving", self.worker_id, reason)
        health = getattr(self, "health", None)  # None: still starting, and it fails to start
        if health is not None:
            health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)

    def info(self) -> WorkerInfo:
        return dataclasses.replace(super().info(), outputs_address=self.outputs_address)

    # ---- requests ------------------------------------------------------------------------
    def start(self, req: DecodeRequest) -> None:
        """Take ``req``: admitted at once, or when its pushed blocks have landed. Returns at
        once; its tokens, or its error, come out on the output stream."""
        self.admissions.arrive(req)

    def on_transfer_done(self, req_id: str, ok: bool, first_token: int | None = None) -> None:
        self.admissions.pushed(req_id, ok, first_token)

    def first_token(self, req_id: str, token: int | None, push_coming: bool = True) -> None:
        """The router's word on ``req_id``'s first token (None: none was sampled, compute it)
        and whether its blocks are being pushed at all."""
        self.admissions.told(req_id, token, push_coming)

    def _admit(self, req: DecodeRequest, outcome: str, waited_s: float) -> None:
        with self._stats_lock:
            key = {"ok": "transfers_ok", "failed": "transfers_failed"}.get(outcome)
            if outcome == "timed_out":
                key = "transfers_timed_out"
            if key is not None:
                self.transfer_stats[key] += 1
            self.transfer_stats["transfer_wait_seconds"] += waited_s
        if outcome == "timed_out" and self.receiver.cancel_transfer(req.req_id):
            logger.warning(
                "push of %s stalled past %.1f s: cancelled; computing what is missing",
                req.req_id,
                req.transfer_timeout_s,
            )
        self.loop.submit_published(
            req.req_id, list(req.token_ids), req.sampling, req.cache_salt,
            prefill_len=req.num_prompt_tokens or None,
        )  # fmt: skip

    def _aborted_while_waiting(self, req_id: str) -> None:
        self.receiver.cancel_transfer(req_id)
        self.outputs.publish([], {req_id: RequestAborted(f"request {req_id} was aborted")})

    def abort(self, req_id: str) -> None:
        if not self.admissions.abort(req_id):
            super().abort(req_id)  # admitted (or never seen): the loop aborts it if it runs

    def stats(self) -> dict[str, float]:
        with self._stats_lock:
            t = dict(self.transfer_stats)
        return {
            **super().stats(),
            **t,
            "admissions_waiting": float(self.admissions.num_waiting),
            "output_messages": float(self.outputs.num_messages),
            "outputs_dropped": float(self.outputs.num_dropped),
            "shm_torn_frames": float(self.receiver.num_torn),
            "pushes_open": float(self.receiver.num_open_pushes),
        }

    def shutdown(self) -> None:
        self.admissions.close()
        super().shutdown()
        self.outputs.close()


def continuation(sampling: SamplingParams) -> SamplingParams:
    """Sampling of the decode part: one token fewer (the prefill worker sampled the first)."""
    return dataclasses.replace(sampling, max_tokens=sampling.max_tokens - 1)
