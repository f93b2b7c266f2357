"""The client-facing ``Generation`` service. gRPC status codes are chosen here and nowhere else.

| failure                                   | status             |
| ----------------------------------------- | ------------------ |
| ``ValueError`` (validation or backend)    | INVALID_ARGUMENT   |
| more than ``max_in_flight`` requests      | RESOURCE_EXHAUSTED |
| ``OverloadedError`` from the backend      | RESOURCE_EXHAUSTED |
| ``OverflowError`` (a worker's queue full) | RESOURCE_EXHAUSTED |
| ``NoWorkerError``, other ``StrataError``  | UNAVAILABLE        |
| deadline passed (``RequestTimeoutError``) | DEADLINE_EXCEEDED  |
| bad or missing bearer token               | UNAUTHENTICATED    |
| anything else                             | INTERNAL (logged)  |

The HTTP front door (``router/http_api.py``) runs requests through the same ``stream`` and maps
the same statuses to HTTP (``HTTP_STATUS``): 400, 429, 503, 504, 401, 500.

The servicer runs on the router's event loop (``grpc.aio``, ``router.event_loop``): a request
is a coroutine, its tokens arrive by futures, and one thread serves every stream. A client that
cancels (or whose deadline passes) makes the servicer call ``backend.cancel(req_id)`` once,
unless the request had already finished, and close the backend's stream.

Every request that ends with an error is counted by cause
(``strata_router_requests_failed_total``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, Protocol

import grpc

from proto import strata_pb2, strata_pb2_grpc
from proto.errors import StrataError
from router.auth import check_bearer, is_open_method
from router.config import RouterConfig
from router.detokenize import IncrementalDetokenizer
from router.errors import NoWorkerError, OverloadedError, RequestTimeoutError
from router.metrics import RouterMetrics
from router.types import GenRequest, TokenDelta, Usage
from router.validation import Tokenizer, validate_request

logger = logging.getLogger(__name__)

SERVICE_NAME = "strata.v1.Generation"


class Backend(Protocol):
    """What the router needs from the cluster (implemented over Ray actors)."""

    def generate(self, req: GenRequest, context_deadline_s: float) -> AsyncIterator[TokenDelta]:
        """Token deltas of ``req`` (an async iterator, on the router's loop); the last one has
        finish_reason and usage. Closing it early stops the request."""
        ...

    def cancel(self, req_id: str) -> None:
        """The client left: stop ``req_id`` (non-blocking)."""
        ...

    def stats(self) -> dict[str, dict[str, float]]:
        """Per-worker metrics (may block: called off the loop)."""
        ...

    def healthy(self) -> bool:
        """Whether a request can be served now (non-blocking)."""
        ...


class MalformedRequestError(ValueError):
    """The request's bytes are not a valid message of its type (-> INVALID_ARGUMENT)."""


_CAUSE_TAG = re.compile(r"\[cause=(\w+)")


def failure_cause(exc: BaseException) -> str:
    """The cause a failed request is counted under: the backend's own tag when its message
    carries one (``[cause=...]``), else the kind of error."""
    tagged = _CAUSE_TAG.search(str(exc))
    if tagged:
        return tagged.group(1)
    code, _ = status_for(exc)
    return {
        grpc.StatusCode.INVALID_ARGUMENT: "invalid",
        grpc.StatusCode.RESOURCE_EXHAUSTED: "overloaded",
        grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
        grpc.StatusCode.UNAVAILABLE: "worker_error",
    }.get(code, "internal")


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one mapping from a failure to a gRPC status code and message."""
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, OverloadedError | OverflowError):  # OverflowError: a worker's queue
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, RequestTimeoutError | TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "deadline exceeded"
    if isinstance(exc, NoWorkerError | StrataError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


# gRPC status -> HTTP status and OpenAI error type, for the HTTP front door (router/http_api.py)
HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.INTERNAL: (500, "internal_error"),
}


def http_status_for(exc: BaseException) -> tuple[int, str, str]:
    """(HTTP status, OpenAI error type, message): the same choice as ``status_for``."""
    code, message = status_for(exc)
    status, kind = HTTP_STATUS.get(code, (500, "internal_error"))
    return status, kind, message


def usage_to_pb(usage: Usage, ttft_ms: float) -> strata_pb2.Usage:
    return strata_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        cached_tokens_by_tier=dict(usage.cached_tokens_by_tier),
        ttft_ms=ttft_ms,
        prefill_worker=usage.prefill_worker,
        decode_worker=usage.decode_worker,
    )


class GenerationServicer(strata_pb2_grpc.GenerationServicer):
    def __init__(
        self,
        backend: Backend,
        tokenizer: Tokenizer,
        config: RouterConfig | None = None,
        metrics: RouterMetrics | None = None,
        model: str = "",
    ) -> None:
        self.backend = backend
        self.model = model  # the served model's name (Health, the HTTP API's /v1/models)
        self.tokenizer = tokenizer
        self.config = config if config is not None else RouterConfig()
        self.metrics = metrics if metrics is not None else RouterMetrics()
        self.num_in_flight = 0  # Generate calls being served (the loop's thread only)
        # set by router.server.serve(): kept in step with Health answers
        self.on_health: Callable[[bool], None] | None = None

    async def Generate(
        self, request: strata_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[strata_pb2.GenerateResponse]:
        try:
            async for msg in self.stream(request, context.time_remaining()):
                yield msg
        except Exception as e:
            code, details = status_for(e)
            await context.abort(code, details)

    async def stream(
        self, request: strata_pb2.GenerateRequest, time_remaining: float | None
    ) -> AsyncGenerator[strata_pb2.GenerateResponse, None]:
        """One request, for the gRPC API and the HTTP front door alike: admission (at most
        ``max_in_flight``), validation, the backend's token stream with text deltas, the
        deadline, metrics. Failures raise; ``status_for`` maps them. Closing the generator (or
        cancelling its task) cancels the request in the backend unless it had finished."""
        arrival = time.monotonic()
        admitted = self.num_in_flight < self.config.max_in_flight
        code: grpc.StatusCode | None = None  # None while streaming; OK once finished
        if admitted:
            self.num_in_flight += 1
            self.metrics.in_flight.inc()
        try:
            if not admitted:
                raise OverloadedError(
                    f"server busy: {self.config.max_in_flight} requests in flight; retry later"
                )
            async for msg in self._stream(request, time_remaining, arrival):
                yield msg
            code = grpc.StatusCode.OK
        except Exception as e:
            code, details = status_for(e)
            if code == grpc.StatusCode.INTERNAL:
                logger.exception("Generate failed")
            else:
                logger.info("Generate refused: %s %s", code.name, details)
            self.metrics.requests_failed_total.labels(cause=failure_cause(e)).inc()
            raise
        finally:
            if admitted:
                self.num_in_flight -= 1
                self.metrics.in_flight.dec()
            # no code: the client went away mid-stream (the generator was closed)
            status = code.name if code is not None else grpc.StatusCode.CANCELLED.name
            self.metrics.requests_total.labels(status=status).inc()

    async def _validate(self, request: strata_pb2.GenerateRequest) -> GenRequest:
        if request.prompt_token_ids and not request.HasField("prompt") and not request.messages:
            return validate_request(request, self.tokenizer, self.config)  # cheap: ids only
        # tokenizing text (or rendering a chat) can take milliseconds: off the loop
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            None, validate_request, request, self.tokenizer, self.config
        )

    async def _stream(
        self,
        request: strata_pb2.GenerateRequest,
        time_remaining: float | None,
        arrival: float,
    ) -> AsyncIterator[strata_pb2.GenerateResponse]:
        req = await self._validate(request)
        budget = self.config.default_timeout_s
        if time_remaining is not None:
            budget = min(budget, time_remaining)
        end = arrival + budget
        detok = IncrementalDetokenizer(self.tokenizer)
        first_token_at: float | None = None
        last_token_at = 0.0
        finished = False
        deltas = self.backend.generate(req, budget)
        try:
            async for delta in deltas:
                now = time.monotonic()
                if delta.token_ids:
                    if first_token_at is None:
                        first_token_at = now
                        self.metrics.ttft_seconds.observe(now - arrival)
                    else:
                        self.metrics.tbt_seconds.observe(now - last_token_at)
                    last_token_at = now
                text = detok.add(delta.token_ids) if delta.token_ids else ""
                if delta.is_final:
                    finished = True
                    yield self._final(req, delta, text + detok.flush(), arrival, first_token_at)
                    return
                if now > end:
                    raise RequestTimeoutError(
                        f"request {req.req_id} exceeded its {budget:.1f} s deadline"
                    )
                if delta.token_ids:
                    yield strata_pb2.GenerateResponse(
                        request_id=req.req_id, token_ids=delta.token_ids, text=text
                    )
        finally:
            if not finished:
                logger.info("request %s cancelled (client gone, deadline or error)", req.req_id)
                self.backend.cancel(req.req_id)
            aclose = getattr(deltas, "aclose", None)
            if aclose is not None:
                await aclose()
        raise AssertionError(f"backend ended request {req.req_id} without a finish reason")

    def _final(
        self,
        req: GenRequest,
        delta: TokenDelta,
        text: str,
        arrival: float,
        first_token_at: float | None,
    ) -> strata_pb2.GenerateResponse:
        usage = delta.usage if delta.usage is not None else Usage()
        ttft_ms = (first_token_at - arrival) * 1e3 if first_token_at is not None else 0.0
        self.metrics.prompt_tokens_total.inc(usage.prompt_tokens)
        self.metrics.completion_tokens_total.inc(usage.completion_tokens)
        for tier, num in usage.cached_tokens_by_tier.items():
            self.metrics.cached_tokens_total.labels(tier=tier).inc(num)
        return strata_pb2.GenerateResponse(
            request_id=req.req_id,
            token_ids=delta.token_ids,
            text=text,
            finish_reason=delta.finish_reason or "",
            usage=usage_to_pb(usage, ttft_ms),
        )

    async def Stats(
        self, request: strata_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> strata_pb2.StatsResponse:
        loop = asyncio.get_running_loop()
        try:  # the backend calls into every worker: off the loop
            per_worker = await loop.run_in_executor(None, self.backend.stats)
        except Exception as e:
            code, details = status_for(e)
            await context.abort(code, details)
        resp = strata_pb2.StatsResponse()
        for worker, values in {**per_worker, "router": self.metrics.snapshot()}.items():
            resp.workers[worker].metrics.update({k: float(v) for k, v in values.items()})
        return resp

    async def Health(
        self, request: strata_pb2.HealthRequest, context: grpc.aio.ServicerContext
    ) -> strata_pb2.HealthResponse:
        try:
            ok, detail = self.backend.healthy(), ""
        except Exception as e:
            ok, detail = False, f"{type(e).__name__}: {e}"
        if self.on_health is not None:
            self.on_health(ok)
        return strata_pb2.HealthResponse(
            serving=ok,
            detail=detail or ("serving" if ok else "no worker can serve"),
            model=self.model,
            max_model_len=self.config.max_model_len,
            vocab_size=self.tokenizer.vocab_size,
            has_chat_template=self.tokenizer.has_chat_template,
        )


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` (health/reflection stay open)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("auth token must be non-empty")
        self._token = token

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        async def deny_stream(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
            yield  # an async generator: the handler of a streaming method

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny_stream)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        metadata = handler_call_details.invocation_metadata
        if is_open_method(method) or check_bearer(metadata, self._token):
            return await continuation(handler_call_details)
        return self._deny_stream if method.endswith("/Generate") else self._deny_unary
