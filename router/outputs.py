"""The router's end of the decode workers' output streams (everything here runs on the router's
event loop, ``router.event_loop``).

One ``OutputStream`` per decode worker holds a ``WorkerOutputs.Subscribe`` stream open (a
``grpc.aio`` call read by one task) and fans each message (one engine step, every sequence of
it) out to the requests' ``TokenQueue``s: a push into a list and, when the request's run is
waiting, the resolution of its future. A request's client stream takes whatever has gathered in
its queue at once, so a client slower than the engine gets fewer, larger messages; a queue never
blocks the fan-out (a client that falls ``max_buffered_tokens`` behind is cut off with
RESOURCE_EXHAUSTED, the other sequences of the step go on). When the stream breaks, every request
listening on it gets ``WorkerLostError`` (its run moves it to another worker) and the stream
ends: ``on_broken`` tells the membership, which takes the worker out of placement and opens a
new stream once the worker answers a health call again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from kvtransfer import wire
from proto import strata_pb2, strata_pb2_grpc
from proto.errors import StrataError
from proto.vocab import FinishReason
from router.errors import OverloadedError, RequestTimeoutError

logger = logging.getLogger(__name__)


class WorkerLostError(StrataError):
    """The decode worker's output stream broke while the request was running there."""


@dataclass(frozen=True)
class Tokens:
    """What a request's queue held when taken: new tokens, and the end if it came."""

    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None  # set once finished
    cached_by_tier: dict[str, int] | None = None  # from the sequence's first output


_TIMED_OUT = object()


def _expire(fut: asyncio.Future[object]) -> None:
    if not fut.done():
        fut.set_result(_TIMED_OUT)


class TokenQueue:
    """One request's tokens from its decode worker until its run takes them (loop thread only:
    no lock)."""

    __slots__ = (
        "req_id",
        "worker_id",
        "max_buffered_tokens",
        "_tokens",
        "_finish",
        "_cached",
        "_error",
        "_waiter",
    )

    def __init__(self, req_id: str, worker_id: str, max_buffered_tokens: int) -> None:
        self.req_id = req_id
        self.worker_id = worker_id
        self.max_buffered_tokens = max_buffered_tokens
        self._tokens: list[int] = []
        self._finish: str | None = None
        self._cached: dict[str, int] | None = None
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[object] | None = None

    def push(
        self, token_ids: list[int], finish: FinishReason | None, cached: dict[str, int] | None
    ) -> bool:
        """Called by the fan-out; False once the request is over (the fan-out forgets it)."""
        if self._error is not None or self._finish is not None:
            return False
        self._tokens.extend(token_ids)
        if cached is not None:
            self._cached = cached
        if finish:
            self._finish = finish
        elif len(self._tokens) > self.max_buffered_tokens:
            self._error = OverloadedError(
                f"request {self.req_id}: the client fell {len(self._tokens)} tokens behind "
                "the engine and was cut off"
            )
        self._wake()
        return self._error is None and not finish

    def fail(self, error: BaseException) -> None:
        if self._error is None and self._finish is None:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def overrun(self) -> bool:
        return isinstance(self._error, OverloadedError)

    async def get(self, timeout: float) -> Tokens:
        """Everything gathered so far (waits for something); raises the request's error once
        the tokens before it were taken."""
        if not (self._tokens or self._finish or self._error is not None):
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(max(0.0, timeout), _expire, waiter)
            try:
                if await waiter is _TIMED_OUT:
                    raise RequestTimeoutError(
                        f"request {self.req_id}: no token for {timeout:.1f} s"
                    )
            finally:
                timer.cancel()
                self._waiter = None
        if self._error is not None and not self._tokens:
            raise self._error
        tokens, self._tokens = tuple(self._tokens), []
        cached, self._cached = self._cached, None
        return Tokens(tokens, self._finish, cached)


def _error_for(code: str, message: str) -> BaseException:
    if code == "INVALID_ARGUMENT":
        return ValueError(message)
    if code == "RESOURCE_EXHAUSTED":
        return OverloadedError(message)
    if code == "DEADLINE_EXCEEDED":
        return RequestTimeoutError(message)
    return StrataError(message)


class OutputStream:
    """The subscription to one decode worker's outputs (see the module docstring). Made, used
    and closed on the router's loop."""

    def __init__(
        self,
        worker_id: str,
        address: str,
        secret: str | None,
        on_broken: Callable[[OutputStream, BaseException], None],
        on_overrun: Callable[[str, str], None] | None = None,
        max_buffered_tokens: int = 4096,
    ) -> None:
        self.worker_id = worker_id
        self.address = address
        self.on_broken = on_broken  # (this stream, error): the worker leaves placement
        self.on_overrun = on_overrun  # (worker_id, req_id): a client fell too far behind
        self.max_buffered_tokens = max_buffered_tokens
        self._metadata = ((wire.SECRET_METADATA_KEY, secret),) if secret is not None else ()
        self._queues: dict[str, TokenQueue] = {}
        self._connected = asyncio.Event()
        self._closed = False
        self._channel = grpc.aio.insecure_channel(address, options=wire.channel_options())
        self.num_messages = 0
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"outputs-{worker_id}"
        )

    @property
    def connected(self) -> bool:
        return self._connected.is_set() and not self._closed

    async def wait_connected(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return not self._closed

    def register(self, req_id: str) -> TokenQueue:
        """Listen for ``req_id``'s outputs; ``WorkerLostError`` while the stream is down (what
        the worker publishes then is lost)."""
        if not self.connected:
            raise WorkerLostError(f"output stream of decode worker {self.worker_id} is down")
        q = TokenQueue(req_id, self.worker_id, self.max_buffered_tokens)
        self._queues[req_id] = q
        return q

    def unregister(self, req_id: str) -> None:
        self._queues.pop(req_id, None)

    @property
    def num_requests(self) -> int:
        return len(self._queues)

    def close(self, why: str = "left") -> None:
        """End the subscription; the requests still listening get ``WorkerLostError``."""
        if self._closed:
            return
        self._closed = True
        self._task.cancel()
        self._fail_all(WorkerLostError(f"decode worker {self.worker_id} {why}"))
        asyncio.get_running_loop().create_task(self._channel.close())

    # ---- the stream's task ---------------------------------------------------------------
    async def _run(self) -> None:
        stub = strata_pb2_grpc.WorkerOutputsStub(self._channel)
        try:
            call = stub.Subscribe(
                strata_pb2.SubscribeRequest(subscriber="router"), metadata=self._metadata
            )
            expected = 0
            async for msg in call:
                if msg.seq != expected:
                    raise WorkerLostError(
                        f"outputs of {self.worker_id}: message {msg.seq} after {expected - 1}"
                    )
                expected = msg.seq + max(1, msg.num_steps)
                if msg.num_steps == 0:
                    self._connected.set()
                    continue
                self._dispatch(msg)
            error: BaseException = WorkerLostError(
                f"decode worker {self.worker_id} ended its output stream"
            )
        except asyncio.CancelledError:
            return  # closed
        except grpc.aio.AioRpcError as e:
            error = WorkerLostError(
                f"output stream of decode worker {self.worker_id} broke: {e.code().name}"
            )
        except WorkerLostError as e:
            error = e
        if self._closed:
            return
        self._closed = True
        self._fail_all(error)
        logger.warning("%s", error)
        await self._channel.close()
        self.on_broken(self, error)

    def _dispatch(self, msg: strata_pb2.StepOutputs) -> None:
        self.num_messages += 1
        queues = self._queues
        tokens = msg.token_ids
        cache_hits = msg.cache_hits
        done: list[str] = []
        pos = 0
        for req_id, n, finish in zip(msg.req_ids, msg.num_tokens, msg.finish_reasons):
            start, pos = pos, pos + n
            q = queues.get(req_id)
            if q is None:
                continue  # cancelled or moved elsewhere: nobody listens any more
            if finish == FinishReason.ERROR:
                err = msg.errors.get(req_id)
                q.fail(_error_for(err.code, err.message) if err else StrataError("failed"))
                done.append(req_id)
                continue
            hits = cache_hits.get(req_id) if cache_hits else None
            cached = dict(hits.tokens_by_tier) if hits is not None else None
            reason = FinishReason(finish) if finish else None
            if not q.push(list(tokens[start:pos]), reason, cached):
                done.append(req_id)
                if self.on_overrun is not None and q.overrun:
                    self.on_overrun(self.worker_id, req_id)
        for req_id in done:
            queues.pop(req_id, None)

    def _fail_all(self, error: BaseException) -> None:
        self._connected.clear()
        queues, self._queues = list(self._queues.values()), {}
        for q in queues:
            q.fail(error)
