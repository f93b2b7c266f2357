"""The router's end of the decode workers' output streams.

One ``OutputStream`` per decode worker holds a ``WorkerOutputs.Subscribe`` stream open on a
thread of its own and fans each message (one engine step, every sequence of it) out to the
requests' ``TokenQueue``s. A request's client stream takes whatever has gathered in its queue at
once, so a client slower than the engine gets fewer, larger messages; a queue never blocks the
fan-out (a client that falls ``max_buffered_tokens`` behind is cut off with RESOURCE_EXHAUSTED,
the other sequences of the step go on). When the stream breaks, every request listening on it
gets ``WorkerLostError`` (the backend retries them elsewhere) and the stream reconnects.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from kvstore.errors import StrataError
from kvtransfer import wire
from proto import strata_pb2, strata_pb2_grpc
from router.errors import OverloadedError, RequestTimeoutError

logger = logging.getLogger(__name__)


class WorkerLostError(StrataError):
    """The decode worker's output stream broke while the request was running there."""


@dataclass(frozen=True)
class Tokens:
    """What a request's queue held when taken: new tokens, and the end if it came."""

    token_ids: tuple[int, ...]
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    cached_by_tier: dict[str, int] | None = None  # from the sequence's first output


class TokenQueue:
    """One request's tokens from its decode worker until its client stream takes them."""

    def __init__(self, req_id: str, worker_id: str, max_buffered_tokens: int) -> None:
        self.req_id = req_id
        self.worker_id = worker_id
        self.max_buffered_tokens = max_buffered_tokens
        self._cond = threading.Condition(threading.Lock())
        self._tokens: list[int] = []
        self._finish: str | None = None
        self._cached: dict[str, int] | None = None
        self._error: BaseException | None = None

    def push(self, token_ids: list[int], finish: str, cached: dict[str, int] | None) -> bool:
        """Called by the fan-out; False once the request is over (the fan-out forgets it)."""
        with self._cond:
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
            self._cond.notify()
            return self._error is None and not finish

    def fail(self, error: BaseException) -> None:
        with self._cond:
            if self._error is None and self._finish is None:
                self._error = error
                self._cond.notify()

    @property
    def overrun(self) -> bool:
        with self._cond:
            return isinstance(self._error, OverloadedError)

    def get(self, timeout: float) -> Tokens:
        """Everything gathered so far (waits for something); raises the request's error."""
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._tokens or self._finish or self._error is not None, timeout
            ):
                raise RequestTimeoutError(f"request {self.req_id}: no token for {timeout:.1f} s")
            if self._error is not None and not self._tokens:
                raise self._error
            tokens, self._tokens = tuple(self._tokens), []
            cached, self._cached = self._cached, None
            finish = self._finish if not self._tokens else None
            return Tokens(tokens, finish, cached)


def _error_for(code: str, message: str) -> BaseException:
    if code == "INVALID_ARGUMENT":
        return ValueError(message)
    if code == "RESOURCE_EXHAUSTED":
        return OverloadedError(message)
    if code == "DEADLINE_EXCEEDED":
        return RequestTimeoutError(message)
    return StrataError(message)


class OutputStream:
    """The subscription to one decode worker's outputs (see the module docstring)."""

    def __init__(
        self,
        worker_id: str,
        address: str,
        secret: str | None,
        on_broken: Callable[[str, BaseException], None],
        on_overrun: Callable[[str, str], None] | None = None,
        max_buffered_tokens: int = 4096,
        reconnect_s: float = 0.5,
    ) -> None:
        self.worker_id = worker_id
        self.address = address
        self.on_broken = on_broken  # (worker_id, error): the backend checks the worker
        self.on_overrun = on_overrun  # (worker_id, req_id): a client fell too far behind
        self.max_buffered_tokens = max_buffered_tokens
        self.reconnect_s = reconnect_s
        self._metadata = ((wire.SECRET_METADATA_KEY, secret),) if secret is not None else ()
        self._lock = threading.Lock()
        self._queues: dict[str, TokenQueue] = {}
        self._connected = threading.Event()
        self._closed = threading.Event()
        self._call: grpc.Future | None = None
        self._channel = grpc.insecure_channel(address, options=wire.channel_options())
        self.num_messages = 0
        self._thread = threading.Thread(target=self._run, name=f"outputs-{worker_id}", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def register(self, req_id: str) -> TokenQueue:
        """Listen for ``req_id``'s outputs; ``WorkerLostError`` while the stream is down (what
        the worker publishes then is lost)."""
        q = TokenQueue(req_id, self.worker_id, self.max_buffered_tokens)
        with self._lock:
            if not self._connected.is_set():
                raise WorkerLostError(f"output stream of decode worker {self.worker_id} is down")
            self._queues[req_id] = q
        return q

    def unregister(self, req_id: str) -> None:
        with self._lock:
            self._queues.pop(req_id, None)

    @property
    def num_requests(self) -> int:
        with self._lock:
            return len(self._queues)

    def close(self) -> None:
        self._closed.set()
        call = self._call
        if call is not None:
            call.cancel()
        self._fail_all(WorkerLostError(f"decode worker {self.worker_id} left"))
        self._channel.close()

    # ---- the stream's thread -------------------------------------------------------------
    def _run(self) -> None:
        stub = strata_pb2_grpc.WorkerOutputsStub(self._channel)
        while not self._closed.is_set():
            error: BaseException | None = None
            try:
                call = stub.Subscribe(
                    strata_pb2.SubscribeRequest(subscriber="router"), metadata=self._metadata
                )
                self._call = call
                expected = 0
                for msg in call:
                    if msg.seq != expected:
                        raise WorkerLostError(
                            f"outputs of {self.worker_id}: message {msg.seq} after {expected - 1}"
                        )
                    expected = msg.seq + max(1, msg.num_steps)
                    if msg.num_steps == 0:
                        self._connected.set()
                        continue
                    self._dispatch(msg)
                error = WorkerLostError(f"decode worker {self.worker_id} ended its output stream")
            except grpc.RpcError as e:
                error = WorkerLostError(
                    f"output stream of decode worker {self.worker_id} broke: "
                    f"{e.code().name if isinstance(e, grpc.Call) else e}"
                )
            except WorkerLostError as e:
                error = e
            self._fail_all(error)  # (and refuses new requests until it is back)
            if self._closed.is_set():
                return
            logger.warning("%s", error)
            self.on_broken(self.worker_id, error)
            self._closed.wait(self.reconnect_s)

    def _dispatch(self, msg: strata_pb2.StepOutputs) -> None:
        self.num_messages += 1
        ids = list(msg.req_ids)
        counts = list(msg.num_tokens)
        tokens = list(msg.token_ids)
        finishes = list(msg.finish_reasons)
        with self._lock:
            queues = [self._queues.get(r) for r in ids]
        done: list[str] = []
        pos = 0
        for req_id, q, n, finish in zip(ids, queues, counts, finishes):
            chunk = tokens[pos : pos + n]
            pos += n
            if q is None:
                continue  # cancelled or retried elsewhere: nobody listens any more
            if finish == "error":
                err = msg.errors.get(req_id)
                q.fail(_error_for(err.code, err.message) if err else StrataError("failed"))
                done.append(req_id)
                continue
            hits = msg.cache_hits.get(req_id)
            cached = dict(hits.tokens_by_tier) if hits is not None else None
            if not q.push(chunk, finish, cached):
                done.append(req_id)
                if self.on_overrun is not None and q.overrun:
                    self.on_overrun(self.worker_id, req_id)
        if done:
            with self._lock:
                for req_id in done:
                    self._queues.pop(req_id, None)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            self._connected.clear()
            queues, self._queues = list(self._queues.values()), {}
        for q in queues:
            q.fail(error)


def wait_all_connected(streams: list[OutputStream], timeout: float) -> list[str]:
    """Wait for every stream to be subscribed; returns the worker ids that are not."""
    end = time.monotonic() + timeout
    return [s.worker_id for s in streams if not s.wait_connected(max(0.0, end - time.monotonic()))]
