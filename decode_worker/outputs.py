"""``OutputHub``: a decode worker's token stream to the router, one message per engine step.

The engine loop hands over the outputs of every published request of a step in one call
(``publish``, on the loop thread; an abort of a request still waiting for its blocks publishes
from the caller's thread); the hub turns them into one ``StepOutputs`` message (columns:
request ids, token counts, tokens, finish reasons) and queues it for the subscriber, the router,
which holds one long-lived ``WorkerOutputs.Subscribe`` stream per decode worker. When the
subscriber lags, the messages waiting are merged into one, so it never falls further behind
than one message of work. A new subscription replaces the old one (a restarted router); while
nobody listens, outputs are dropped (the router fails over what it cannot hear).
"""

from __future__ import annotations

import hmac
import logging
import queue
import threading
from collections.abc import Iterator

import grpc

from engine.loop import RequestAborted
from engine.sequence import StepOutput
from kvtransfer import wire
from proto import strata_pb2, strata_pb2_grpc
from proto.vocab import FinishReason

logger = logging.getLogger(__name__)

_IDLE_POLL_S = 1.0  # how often an idle stream checks that its subscriber is still there


def error_code(err: BaseException) -> str:
    """The status a request's error maps to (the router raises the matching error)."""
    if isinstance(err, ValueError):
        return "INVALID_ARGUMENT"
    if isinstance(err, OverflowError):
        return "RESOURCE_EXHAUSTED"
    if isinstance(err, TimeoutError):
        return "DEADLINE_EXCEEDED"
    return "INTERNAL"


class _Subscription:
    def __init__(self, subscriber: str, max_queued: int) -> None:
        self.subscriber = subscriber
        self.q: queue.Queue[strata_pb2.StepOutputs] = queue.Queue(max_queued)
        self.ended = threading.Event()


class OutputHub(strata_pb2_grpc.WorkerOutputsServicer):
    def __init__(self, secret: str | None = None, max_queued: int = 1024) -> None:
        self.secret = secret
        self.max_queued = max_queued
        self._lock = threading.Lock()
        self._sub: _Subscription | None = None
        self._seq = 0  # steps published to the current subscription
        self.num_messages = 0
        self.num_dropped = 0  # outputs published while nobody listened

    # ---- the loop thread -----------------------------------------------------------------
    def publish(self, outputs: list[StepOutput], errors: dict[str, BaseException]) -> None:
        msg = strata_pb2.StepOutputs(
            req_ids=[o.req_id for o in outputs],
            num_tokens=[len(o.new_token_ids) for o in outputs],
            token_ids=[t for o in outputs for t in o.new_token_ids],
            finish_reasons=[o.finish_reason or "" for o in outputs],
            num_steps=1,
        )
        for o in outputs:
            if o.num_output_tokens == len(o.new_token_ids):  # the sequence's first output
                msg.cache_hits[o.req_id].tokens_by_tier.update(o.cached_by_tier)
        for req_id, err in errors.items():
            msg.req_ids.append(req_id)
            msg.num_tokens.append(0)
            if isinstance(err, RequestAborted):
                msg.finish_reasons.append(FinishReason.ABORT)
                continue
            msg.finish_reasons.append(FinishReason.ERROR)
            msg.errors[req_id].code = error_code(err)
            msg.errors[req_id].message = str(err) or type(err).__name__
        with self._lock:  # numbered and queued together: two publishers never swap places
            sub = self._sub
            if sub is None:
                self.num_dropped += len(msg.req_ids)
                return
            self._seq += 1
            msg.seq = self._seq
            try:
                sub.q.put_nowait(msg)
                self.num_messages += 1
                return
            except queue.Full:  # a subscriber this far behind is gone: let it reconnect
                self._sub = None
        logger.warning(
            "subscriber %s fell %d messages behind; ending it", sub.subscriber, self.max_queued
        )
        sub.ended.set()

    # ---- the gRPC service ----------------------------------------------------------------
    def Subscribe(  # gRPC method name
        self, request: strata_pb2.SubscribeRequest, context: grpc.ServicerContext
    ) -> Iterator[strata_pb2.StepOutputs]:
        if self.secret is not None:
            given = dict(context.invocation_metadata()).get(wire.SECRET_METADATA_KEY, "")
            if not isinstance(given, str) or not hmac.compare_digest(
                given.encode(), self.secret.encode()
            ):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong x-strata-secret")
        sub = _Subscription(request.subscriber or context.peer(), self.max_queued)
        with self._lock:
            old, self._sub, self._seq = self._sub, sub, 0
        if old is not None:
            self._end(old)
        logger.info("outputs subscribed by %s", sub.subscriber)
        try:
            yield strata_pb2.StepOutputs(seq=0, num_steps=0)  # tells the subscriber it is on
            while not sub.ended.is_set() and context.is_active():
                try:
                    msg = sub.q.get(timeout=_IDLE_POLL_S)
                except queue.Empty:
                    continue
                yield _merge_waiting(msg, sub.q)
        finally:
            with self._lock:
                if self._sub is sub:
                    self._sub = None

    def _end(self, sub: _Subscription) -> None:
        with self._lock:
            if self._sub is sub:
                self._sub = None
        sub.ended.set()

    def close(self) -> None:
        with self._lock:
            sub = self._sub
        if sub is not None:
            self._end(sub)


def _merge_waiting(
    msg: strata_pb2.StepOutputs, q: queue.Queue[strata_pb2.StepOutputs]
) -> strata_pb2.StepOutputs:
    """``msg`` with every message already queued behind it appended (columns concatenate)."""
    seq, steps = msg.seq, msg.num_steps
    merged = False
    while True:
        try:
            nxt = q.get_nowait()
        except queue.Empty:
            break
        msg.MergeFrom(nxt)
        steps += nxt.num_steps
        merged = True
    if merged:
        msg.seq, msg.num_steps = seq, steps
    return msg
